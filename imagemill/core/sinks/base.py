"""What a sink is: the `Sink` protocol, the capabilities some sinks add, and the
context-manager behaviour every sink shares (close on success, abort on error).
"""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

from pydantic import ValidationError

from imagemill.core.schemas import ImageRef, Record

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# a record's key: (uri, etag, signature); see `Record.key`
Key = tuple[str, str | None, str]
# what an upload event says of an object: (uri, etag or '', when it happened)
ObjectChange = tuple[str, str, datetime]
# records per batch read back: pydantic records are built one by one
DEFAULT_BATCH = 4096
# what a RECORDS argument (retag, export, dedup) may name
RECORD_SOURCES = "a .jsonl/.jsonl.gz/.parquet file, postgresql://…, s3://bucket/prefix/ or file:///dir/"


@runtime_checkable
class Sink(Protocol):
    """A destination for records. `chunk` names the unit of work (e.g. `job/000042`): writing
    the same chunk again must leave one copy of each record. `close` makes everything durable.

    A context manager: `with open_sink(url) as sink:` closes on success and aborts on error."""

    def write(self, records: Sequence[Record], chunk: str) -> None: ...

    def check(self) -> None:
        """Reach the destination now; UserError saying why it cannot be used."""

    def close(self) -> None: ...

    def abort(self) -> Path | None:
        """The work failed: release the destination; a file sink returns where the partial output is."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None: ...


@runtime_checkable
class KeyedSink(Protocol):
    """A sink that can say which record keys it already holds without errors."""

    def existing_keys(self, keys: Iterable[Key]) -> set[Key]: ...


@runtime_checkable
class SelectiveSink(Protocol):
    """A sink that can hold only some records (object tags: only those of s3:// objects).
    The run loop asks it before each write: a record it refuses is counted as failed, never skipped silently."""

    def refusal(self, record: Record) -> str | None:
        """Why this record cannot be written here, or None when it can."""


@runtime_checkable
class SearchableSink(Protocol):
    """A sink that can find a job's failed records again (for `imagemill retry`)."""

    def failed_records(self, job_id: str) -> list[Record]: ...


@runtime_checkable
class ReadableSink(Protocol):
    """A sink whose records can be read back (retag, export, dedup), streamed in lists of at most
    `batch_size`: the current set, one record per image as it is now, or with `history` every
    record kept. UserError (one line) for one that cannot be read."""

    def read(self, *, history: bool = False, batch_size: int = DEFAULT_BATCH) -> Iterator[list[Record]]: ...


@dataclass(frozen=True)
class StoredEmbeddings:
    """A batch of stored records read for work that needs only their keys and embeddings (retag
    in place): per row its key, whether its record keeps its task options, and its embedding's
    (model, revision, dim), None for a record without one; `vectors` holds the rows that have one,
    in order, as one float32 matrix."""

    uris: list[str]
    etags: list[str]
    signatures: list[str]
    known_options: list[bool]
    models: list[tuple[str, str | None, int] | None]
    vectors: "npt.NDArray[np.float32]"


@dataclass(frozen=True)
class RetaggedRow:
    """One stored record retagged in place: its key, its new signature, and its new `tags` and
    `task_options` as JSON text (None: the record keeps none). The store builds the new row from
    the old one."""

    uri: str
    etag: str
    old_signature: str
    signature: str
    tags: str
    task_options: str | None


@runtime_checkable
class IncrementalSink(Sink, KeyedSink, Protocol):
    """The local output file: it remembers an earlier run's records, copies those still wanted
    (`keep`), and on `abort` leaves the earlier file as it was."""

    def keep(self, keys: Iterable[Key]) -> None: ...

    def abort(self) -> Path: ...


@dataclass(frozen=True)
class ListingMarks:
    """What a completed listing changed in a sink: rows marked deleted, rows of objects listed
    again after being marked deleted, rows superseded by a newer object version, rows current again."""

    deleted: int = 0
    reappeared: int = 0
    superseded: int = 0
    restored: int = 0


class PrefixListing(Protocol):
    """One listing of everything under a URI prefix, as a sink follows it.

    `record(refs)` passes the refs through unchanged and remembers each one (skipped refs too: pass
    it the listing before anything is dropped); `complete` turns true only when that iterator is
    exhausted. `finish()` then marks what the listing no longer holds; on an incomplete listing it
    marks nothing and returns None. `close()` forgets the listing."""

    @property
    def complete(self) -> bool: ...

    def record(self, refs: Iterable[ImageRef]) -> Iterator[ImageRef]: ...

    def finish(self) -> ListingMarks | None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None: ...


@runtime_checkable
class MarksDeleted(Protocol):
    """A sink that keeps "what is true now" beside its history: after a complete listing
    of a prefix it marks the records of objects no longer listed there as deleted, and those of
    replaced objects (another etag listed) as superseded; upload events (`imagemill watch`) mark
    the same, object by object. PostgreSQL only: object sinks are append-only."""

    def listing(self, uri_prefix: str) -> PrefixListing: ...

    def mark_events(self, created: Sequence[ObjectChange], removed: Sequence[ObjectChange]) -> ListingMarks: ...


class SinkContext:
    """Mixed into every sink: `with` closes on success and aborts on error (KeyboardInterrupt too)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> Path | None:
        """Most sinks have nothing to undo (each write is durable on its own): release the connection."""
        self.close()
        return None


def first_error(exc: ValidationError) -> str:
    """The first thing wrong with a stored row that is not a record, in one line for the message."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "record"
    return f"{where}: {error['msg']}"
