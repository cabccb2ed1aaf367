"""S3 event notifications read into object events: what was created or removed, where, when.

One JSON shape for AWS (straight from S3 or wrapped by SNS), MinIO, Ceph RGW and the others that
copy it; the test event, other event types and keys without an image extension are left out.
"""

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from urllib.parse import unquote_plus

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagemill.core.images import s3_uri
from imagemill.core.schemas import ImageRef
from imagemill.pipeline.sources import is_image_name

log = logging.getLogger(__name__)


class Change(StrEnum):
    CREATED = "created"
    REMOVED = "removed"


# event names (after an optional `s3:`, which MinIO puts before them) by what they say of the object
_CREATED = ("ObjectCreated:",)
_REMOVED = ("ObjectRemoved:", "LifecycleExpiration:Delete")
TEST_EVENT = "s3:TestEvent"


@dataclass(frozen=True)
class ObjectEvent:
    """One object created or removed: its `s3://` uri (the key decoded), etag and size as the event
    gives them, and when it happened (the event's time, seconds since the epoch)."""

    change: Change
    uri: str
    etag: str | None
    size: int | None
    event_time: float

    @property
    def ref(self) -> ImageRef:
        return ImageRef(uri=self.uri, etag=self.etag, size=self.size)


@dataclass(frozen=True)
class Parsed:
    """What one message held: its object events, and how many of its records were left out."""

    events: list[ObjectEvent]
    ignored: int = 0


class _Object(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key: str = Field(min_length=1)
    size: int | None = Field(default=None, ge=0)
    etag: str | None = Field(default=None, alias="eTag")


class _Bucket(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)


class _S3(BaseModel):
    model_config = ConfigDict(extra="ignore")

    bucket: _Bucket
    object: _Object


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")

    event_name: str = Field(alias="eventName")
    event_time: datetime = Field(alias="eventTime")
    s3: _S3


def parse(body: str | bytes) -> Parsed:
    """The object events of one message body. ValueError (one line) for a body that is not S3
    event JSON; the test event and events of other kinds are `ignored`, as are keys without an
    image extension (a listing skips them the same way)."""
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    document = _unwrapped(document)
    if not isinstance(document, dict):
        raise ValueError("not an S3 event: expected a JSON object")
    if document.get("Event") == TEST_EVENT:  # sent once when a bucket's notifications are configured
        return Parsed([], ignored=1)
    records = document.get("Records")
    if not isinstance(records, list):
        raise ValueError("not an S3 event: no Records list")
    events: list[ObjectEvent] = []
    ignored = 0
    for index, item in enumerate(records):
        try:
            record = _Record.model_validate(item)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise ValueError(f"not an S3 event: Records[{index}].{where}: {error['msg']}") from None
        event = _event(record)
        if event is None:
            ignored += 1
        else:
            events.append(event)
    return Parsed(events, ignored)


def _unwrapped(document: Any) -> Any:
    """The S3 event inside an SNS notification (a queue subscribed to a topic), else the document."""
    if isinstance(document, dict) and document.get("Type") == "Notification" and "Message" in document:
        try:
            return json.loads(document["Message"])
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"SNS notification whose Message is not JSON: {exc}") from None
    return document


def _event(record: _Record) -> ObjectEvent | None:
    name = record.event_name.removeprefix("s3:")
    if name.startswith(_CREATED):
        change = Change.CREATED
    elif name.startswith(_REMOVED):
        change = Change.REMOVED
    else:  # restores, tagging, replication: nothing a record depends on
        return None
    # S3 sends keys URL-encoded, with a space as '+' (a '+' in a key arrives as %2B)
    key = unquote_plus(record.s3.object.key)
    if key.endswith("/") or not is_image_name(key):
        return None
    etag = (record.s3.object.etag or "").strip('"') or None
    return ObjectEvent(
        change=change,
        uri=s3_uri(record.s3.bucket.name, key),
        etag=etag,
        size=record.s3.object.size,
        event_time=record.event_time.timestamp(),
    )


def latest_per_object(events: list[ObjectEvent]) -> list[ObjectEvent]:
    """Each object's last event, by event time (arrival order among equal times), in that order: an
    object created and removed within one batch is only removed; removed and created again, created."""
    last: dict[str, ObjectEvent] = {}
    for event in events:
        kept = last.get(event.uri)
        if kept is None or event.event_time >= kept.event_time:
            last[event.uri] = event
    return sorted(last.values(), key=lambda event: event.event_time)
