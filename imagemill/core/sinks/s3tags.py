"""Object-tags sink: writes each record's results onto its own S3 object as tags (`imagemill-flagged=true`).

Merges with the object's existing tags within S3's limits (10 tags, 128/256 characters, a small alphabet).
"""

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from imagemill.core.errors import UserError
from imagemill.core.images import LazyS3Client, parse_s3
from imagemill.core.schemas import Record
from imagemill.core.settings import Settings
from imagemill.core.sinks.base import SinkContext
from imagemill.core.sinks.options import split_options

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import TagTypeDef

log = logging.getLogger(__name__)

SCHEME = "s3tags://"
DEFAULT_PREFIX = "imagemill-"
MAX_TAGS = 10
MAX_KEY_CHARS = 128
MAX_VALUE_CHARS = 256
LABEL_SEPARATOR = "/"
SIGNATURE_CHARS = 12

# our tag names, in the order they are kept when an object has no room for all of them
FLAGGED, ERROR, MODERATION, TAGS, SIGNATURE = "flagged", "error", "moderation", "tags", "signature"
PRIORITY = (FLAGGED, ERROR, MODERATION, TAGS, SIGNATURE)
# what a successful run said about the image; a failed re-run leaves these as they were
RESULT_NAMES = (FLAGGED, MODERATION, TAGS)

# S3's documented tag alphabet, kept to ASCII so every S3-compatible server accepts it
_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9+\-=._:/@]+")
_NOT_IN_VALUE = re.compile(r"[^A-Za-z0-9 +\-=._:/@]+")
# within one label the separator is not allowed either, so `dog/beach` always means two labels
_NOT_IN_LABEL = re.compile(r"[^A-Za-z0-9 +\-=._:@]+")
_MISSING_CODES = {"NoSuchKey"}
_DENIED_CODES = {"AccessDenied"}

TagSet = dict[str, str]


class TaggingDenied(ClientError):
    """AccessDenied on one object: still a ClientError, so the chunk task retries it and then fails
    the job with this message as its reason."""

    def __init__(self, uri: str, cause: ClientError) -> None:
        super().__init__(cause.response, cause.operation_name)
        self.uri = uri
        self.args = (
            f"access denied tagging {uri} ({cause.operation_name}): the worker's credentials need "
            "s3:GetObjectTagging and s3:PutObjectTagging on the source objects",
        )

    def __reduce__(self) -> tuple[type, tuple[str, ClientError]]:
        # ClientError's own __reduce__ assumes its two-argument constructor
        return type(self), (self.uri, ClientError(self.response, self.operation_name))


def sanitise(text: str, disallowed: re.Pattern[str] = _NOT_IN_VALUE) -> str:
    """`café, au lait 🐶` -> `cafe au lait`: accents folded, other characters S3 refuses become one space."""
    decomposed = unicodedata.normalize("NFKD", text)
    folded = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(disallowed.sub(" ", folded).split())[:MAX_VALUE_CHARS]


def join_labels(labels: Sequence[str]) -> str:
    """Sanitised, de-duplicated labels joined by `/`, cut at a label boundary to fit 256 characters."""
    joined = ""
    for label in dict.fromkeys(sanitise(label, _NOT_IN_LABEL) for label in labels):
        if not label:
            continue
        candidate = f"{joined}{LABEL_SEPARATOR}{label}" if joined else label
        if len(candidate) > MAX_VALUE_CHARS:
            break
        joined = candidate
    return joined


def object_tags(record: Record, prefix: str = DEFAULT_PREFIX) -> TagSet:
    """The tags a record asks for, keyed `{prefix}{name}`; only for the tasks that ran."""
    tags: TagSet = {}
    if record.moderation is not None:
        tags[FLAGGED] = "true" if record.moderation.flagged else "false"
        if record.moderation.scores:
            label, score = max(record.moderation.scores.items(), key=lambda item: (item[1], item[0]))
            # room for `:0.93` after the label
            tags[MODERATION] = f"{sanitise(label, _NOT_IN_LABEL)[: MAX_VALUE_CHARS - 5]}:{score:.2f}"
    if record.tags is not None:
        ranked = sorted(record.tags.labels, key=lambda label: -label.score)
        if labels := join_labels([label.tag for label in ranked]):
            tags[TAGS] = labels
    if record.error is not None:
        tags[ERROR] = sanitise(record.error.kind.value)
    tags[SIGNATURE] = sanitise(record.signature[:SIGNATURE_CHARS])
    return {f"{prefix}{name}": value for name, value in tags.items() if value}


def merge_tags(existing: Mapping[str, str], record: Record, prefix: str) -> tuple[TagSet, list[str]]:
    """The object's new tag set and the keys of ours that did not fit; the user's tags always stay."""
    theirs = {key: value for key, value in existing.items() if not key.startswith(prefix)}
    ours = object_tags(record, prefix)
    if record.error is not None:
        # a failed re-run (e.g. a transient fetch error) must never un-flag an object
        previous = {prefix + name: existing[prefix + name] for name in RESULT_NAMES if prefix + name in existing}
        ours = {**previous, **ours}
    room = max(MAX_TAGS - len(theirs), 0)
    ranked = [prefix + name for name in PRIORITY if prefix + name in ours]
    kept, dropped = ranked[:room], ranked[room:]
    return {**theirs, **{key: ours[key] for key in kept}}, dropped


def parse_prefix(url: str) -> str:
    """`s3tags://` or `s3tags://?prefix=img-` -> the tag-key prefix; UserError on anything else."""
    if not url.startswith(SCHEME):
        raise UserError(f"sink {url}: expected s3tags:// or s3tags://?prefix=imagemill-")
    location = url[len(SCHEME) :].partition("?")[0]
    if location.strip("/"):
        raise UserError(f"sink {url}: s3tags:// tags each record's own object and takes no bucket or path")
    # `+` stays `+` in the value: it is a legal tag character
    _, options = split_options(url, {"prefix"})
    return check_prefix(url, options.get("prefix", DEFAULT_PREFIX))


def check_prefix(url: str, prefix: str) -> str:
    """`prefix` if it can start our tag keys; UserError naming `url` if not."""
    # an empty prefix would make every tag "ours", so a write would delete the user's tags
    if not _PREFIX_PATTERN.fullmatch(prefix):
        raise UserError(f"sink {url}: prefix {prefix!r} must be non-empty ASCII letters, digits or + - = . _ : / @")
    if prefix.lower().startswith("aws"):
        raise UserError(f"sink {url}: prefix {prefix!r} is reserved by AWS (aws:)")
    longest = max(len(name) for name in PRIORITY)
    if len(prefix) + longest > MAX_KEY_CHARS:
        raise UserError(f"sink {url}: prefix is too long; tag keys are at most {MAX_KEY_CHARS} characters")
    return prefix


class ObjectTagsSink(SinkContext):
    """Tags each s3:// record's own object with its results. Other records cannot be tagged: `refusal`
    says so, and the run loop counts them as `not_written` failures (`write` still skips them).

    Tagging is read-modify-write per object (S3 has no conditional tagging), so two writers tagging
    the same object at once may lose one's update. Within a job they never do: each key is listed
    once, into one chunk; two jobs over overlapping sources at the same moment could.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, settings: Settings | None = None) -> None:
        self.prefix = check_prefix(SCHEME, prefix)
        self._settings = settings or Settings()
        self._s3 = LazyS3Client(self._settings)
        self.counts: Counter[str] = Counter()  # outcomes over the sink's life: tagged, unchanged, missing, not_s3

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None) -> "ObjectTagsSink":
        """`s3tags://[?prefix=imagemill-]` -> a sink tagging with that key prefix."""
        return cls(parse_prefix(url), settings)

    def refusal(self, record: Record) -> str | None:
        """Only an S3 object can carry tags (a `SelectiveSink`)."""
        if record.uri.startswith("s3://"):
            return None
        return f"{SCHEME} tags S3 objects; {record.uri} is not one, so its results were not written"

    @property
    def client(self) -> "S3Client":
        return self._s3.get()

    def write(self, records: Sequence[Record], chunk: str) -> None:
        """Tag every s3:// record's object; AccessDenied and other S3 errors propagate for a retry."""
        # one record per object (the last wins), so the pool never tags one object from two threads
        on_s3 = list({record.uri: record for record in records if record.uri.startswith("s3://")}.values())
        skipped = sum(not record.uri.startswith("s3://") for record in records)
        if skipped:
            log.warning(
                "chunk %s: skipped %d records that are not s3:// objects (only those can be tagged)", chunk, skipped
            )
        outcomes = Counter({"not_s3": skipped}) if skipped else Counter[str]()
        if on_s3:
            # the pool only overlaps round trips; the client is thread-safe and sized for fetch_threads
            with ThreadPoolExecutor(min(self._settings.fetch_threads, len(on_s3))) as pool:
                outcomes.update(pool.map(self.tag_object, on_s3))
        self.counts.update(outcomes)

    def tag_object(self, record: Record) -> str:
        """Merge one record's tags onto its object: `tagged`, `unchanged` or `missing`."""
        location = parse_s3(record.uri)
        try:
            response = self.client.get_object_tagging(Bucket=location.bucket, Key=location.key)
            existing = {tag["Key"]: tag["Value"] for tag in response.get("TagSet", [])}
            merged, dropped = merge_tags(existing, record, self.prefix)
            if dropped:
                theirs = sum(not key.startswith(self.prefix) for key in merged)
                log.warning(
                    "%s keeps its %d own tags; no room for %s (S3 allows %d per object)",
                    record.uri,
                    theirs,
                    ", ".join(dropped),
                    MAX_TAGS,
                )
            if merged == existing:
                return "unchanged"  # a redelivered chunk costs one read per object, no write
            tag_set: list[TagTypeDef] = [{"Key": key, "Value": value} for key, value in merged.items()]
            self.client.put_object_tagging(Bucket=location.bucket, Key=location.key, Tagging={"TagSet": tag_set})
            return "tagged"
        except ClientError as exc:
            return self._object_failed(record.uri, exc)

    def _object_failed(self, uri: str, exc: ClientError) -> str:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING_CODES:
            log.warning("%s no longer exists (deleted since it was listed); not tagged", uri)
            return "missing"
        if code in _DENIED_CODES:
            raise TaggingDenied(uri, exc) from exc
        raise exc

    def check(self) -> None:
        """The S3 endpoint answers and knows our credentials; tagging rights show on the first object."""
        try:
            self.client.list_buckets(MaxBuckets=1)
        except ClientError as exc:
            # AccessDenied still means a reachable endpoint that accepted our signature
            if str(exc.response.get("Error", {}).get("Code", "")) not in _DENIED_CODES:
                raise UserError(f"sink {SCHEME}: S3 refused the check ({exc})") from None
        except BotoCoreError as exc:
            raise UserError(f"sink {SCHEME}: cannot reach S3 ({exc})") from None

    def close(self) -> None:
        """Each object's tags are durable once PutObjectTagging returns: only the connections are closed."""
        self._s3.close()
