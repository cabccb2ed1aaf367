"""Decisions written back onto the S3 objects they are about: `imagemill-review=approved|rejected|escalated`.

The object-tag sink's rules, reused: its key prefix, its tag alphabet and its limits (10 tags per
object, the owner's own tags always kept). When an object has no room, our lowest-ranked tags make
way for the review, which a person decided and so outranks what a model said.
"""

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from imagemill.core.images import LazyS3Client, is_s3, parse_s3
from imagemill.core.settings import Settings
from imagemill.core.sinks.s3tags import (
    _DENIED_CODES,
    _MISSING_CODES,
    DEFAULT_PREFIX,
    MAX_TAGS,
    PRIORITY,
    TaggingDenied,
    TagSet,
    check_prefix,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import TagTypeDef

log = logging.getLogger(__name__)

REVIEW = "review"


def merge_review_tag(existing: Mapping[str, str], outcome: str | None, prefix: str = DEFAULT_PREFIX) -> TagSet | None:
    """The object's tags with `{prefix}review` set to `outcome` (removed when None), or None when
    the owner's own tags leave no room for it."""
    key = prefix + REVIEW
    merged = {k: v for k, v in existing.items() if k != key}
    if outcome is None:
        return merged
    theirs = [k for k in merged if not k.startswith(prefix)]
    if len(theirs) >= MAX_TAGS:
        return None
    ours = [k for k in merged if k.startswith(prefix)]
    rank = {prefix + name: position for position, name in enumerate(PRIORITY)}
    # drop the lowest-ranked of ours (unknown ones of ours first) until the review fits
    for dropped in sorted(ours, key=lambda k: -rank.get(k, len(PRIORITY)))[: max(len(merged) + 1 - MAX_TAGS, 0)]:
        del merged[dropped]
    merged[key] = outcome
    return merged


class ReviewTagger:
    """Tags decided s3:// objects; other URIs are left alone. Failures are logged, never raised:
    the decision is stored in PostgreSQL whatever S3 says."""

    def __init__(self, settings: Settings | None = None, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = check_prefix("s3tags://", prefix)
        self._s3 = LazyS3Client(settings)

    def tag(self, uri: str, outcome: str | None) -> str:
        """Set (or, with None, remove) the review tag: `tagged`, `unchanged`, `not_s3`, `missing`,
        `no_room`, `denied` or `failed`."""
        if not is_s3(uri):
            return "not_s3"
        location = parse_s3(uri)
        client = self._s3.get()
        try:
            response = client.get_object_tagging(Bucket=location.bucket, Key=location.key)
            existing = {tag["Key"]: tag["Value"] for tag in response.get("TagSet", [])}
            merged = merge_review_tag(existing, outcome, self.prefix)
            if merged is None:
                log.warning("%s keeps its %d own tags; no room for %s%s", uri, MAX_TAGS, self.prefix, REVIEW)
                return "no_room"
            if merged == existing:
                return "unchanged"
            tag_set: list[TagTypeDef] = [{"Key": k, "Value": v} for k, v in merged.items()]
            client.put_object_tagging(Bucket=location.bucket, Key=location.key, Tagging={"TagSet": tag_set})
            return "tagged"
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_CODES:
                log.warning("%s no longer exists; its review was not tagged", uri)
                return "missing"
            if code in _DENIED_CODES:
                log.warning("%s", TaggingDenied(uri, exc).args[0])
                return "denied"
            log.warning("tagging %s failed: %s", uri, exc)
            return "failed"
        except BotoCoreError as exc:
            log.warning("tagging %s failed: %s", uri, exc)
            return "failed"

    def close(self) -> None:
        self._s3.close()
