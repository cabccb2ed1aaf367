"""What a results store is: the `RecordWriter` protocol, the capabilities some stores add, and the
context-manager behaviour every writer shares (close on success, abort on error).
"""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from imagemill.core.schemas import ImageRef, Record

# a record's key: (uri, etag, signature); see `Record.key`
Key = tuple[str, str | None, str]


@runtime_checkable
class RecordWriter(Protocol):
    """A destination for records. `chunk` names the unit of work (e.g. `job/000042`): writing
    the same chunk again must leave one copy of each record. `close` makes everything durable.

    A context manager: `with open_writer(url) as writer:` closes on success and aborts on error."""

    def write(self, records: Sequence[Record], chunk: str) -> None: ...

    def check(self) -> None:
        """Reach the destination now; UserError saying why it cannot be used."""

    def close(self) -> None: ...

    def abort(self) -> Path | None:
        """The work failed: release the destination; a file writer returns where the partial output is."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None: ...


@runtime_checkable
class KeyedStore(Protocol):
    """A results store that can say which record keys it already holds without errors."""

    def existing_keys(self, keys: Iterable[Key]) -> set[Key]: ...


@runtime_checkable
class SelectiveStore(Protocol):
    """A results store that can hold only some records (object tags: only those of s3:// objects).
    The run loop asks it before each write: a record it refuses is counted as failed, never skipped silently."""

    def refusal(self, record: Record) -> str | None:
        """Why this record cannot be written here, or None when it can."""


@runtime_checkable
class SearchableStore(Protocol):
    """A results store that can find a job's failed records again (for `imagemill retry`)."""

    def failed_records(self, job_id: str) -> list[Record]: ...


@runtime_checkable
class IncrementalWriter(RecordWriter, KeyedStore, Protocol):
    """The local output file: it remembers an earlier run's records, copies those still wanted
    (`keep`), and on `abort` leaves the earlier file as it was."""

    def keep(self, keys: Iterable[Key]) -> None: ...

    def abort(self) -> Path: ...


@dataclass(frozen=True)
class ListingMarks:
    """What a completed listing changed in a store: rows marked deleted, rows of objects listed
    again after being marked deleted, rows superseded by a newer object version, rows current again."""

    deleted: int = 0
    reappeared: int = 0
    superseded: int = 0
    restored: int = 0


class PrefixListing(Protocol):
    """One listing of everything under a URI prefix, as a store follows it.

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
    """A results store that keeps "what is true now" beside its history: after a complete listing
    of a prefix it marks the records of objects no longer listed there as deleted, and those of
    replaced objects (another etag listed) as superseded. PostgreSQL only: object sinks are append-only."""

    def listing(self, uri_prefix: str) -> PrefixListing: ...


class WriterContext:
    """Mixed into every writer: `with` closes on success and aborts on error (KeyboardInterrupt too)."""

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
