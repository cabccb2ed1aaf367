"""What a results store is: the `RecordWriter` protocol, the capabilities some stores add, and the
context-manager behaviour every writer shares (close on success, abort on error).
"""

from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from imagemill.core.schemas import Record

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
class SearchableStore(Protocol):
    """A results store that can find a job's failed records again (for `imagemill retry`)."""

    def failed_records(self, job_id: str) -> list[Record]: ...


@runtime_checkable
class IncrementalWriter(RecordWriter, KeyedStore, Protocol):
    """The local output file: it remembers an earlier run's records, copies those still wanted
    (`keep`), and on `abort` leaves the earlier file as it was."""

    def keep(self, keys: Iterable[Key]) -> None: ...

    def abort(self) -> Path: ...


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
