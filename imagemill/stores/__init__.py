"""Results stores: where records go. Each store writes batches of records idempotently.

Files (JSONL, Parquet) here; databases and object storage sit beside them behind one interface.
"""

from collections.abc import Sequence
from typing import Protocol

from imagemill.schemas import Record


class RecordWriter(Protocol):
    """A destination for records; `close` makes everything written durable."""

    def write(self, records: Sequence[Record]) -> None: ...

    def close(self) -> None: ...


def open_writer(target: str) -> RecordWriter:
    """Pick the writer for `--out`: by suffix, `.jsonl` or `.parquet`."""
    from imagemill.stores.files import open_file_writer

    return open_file_writer(target)
