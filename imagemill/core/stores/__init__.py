"""Results stores: where records go, side by side behind one interface.

Files (JSONL, Parquet), PostgreSQL, and one object per chunk on S3; every write is idempotent by
record key (uri, etag, signature) or by chunk name, so a redelivered chunk replaces itself.
"""

from collections.abc import Sequence
from typing import Protocol

from imagemill.core.errors import UserError
from imagemill.core.schemas import Record


class RecordWriter(Protocol):
    """A destination for records. `chunk` names the unit of work (e.g. `job/000042`): writing
    the same chunk again must leave one copy of each record. `close` makes everything durable."""

    def write(self, records: Sequence[Record], chunk: str) -> None: ...

    def check(self) -> None:
        """Reach the destination now; UserError saying why it cannot be used."""

    def close(self) -> None: ...


def open_writer(target: str, keep_existing: bool = False) -> RecordWriter:
    """The writer for a sink URL or `--out` path: postgresql://…, s3://bucket/prefix/,
    file:///shared/dir/ (one file per chunk), s3tags:// (results as tags on each record's own
    S3 object), or a *.jsonl / *.parquet file (local mode)."""
    if target.startswith(("postgresql://", "postgres://")):
        from imagemill.core.stores.postgres import PostgresStore

        return PostgresStore(target)
    if target.startswith("s3tags://"):
        from imagemill.core.stores.s3tags import ObjectTagsSink

        return ObjectTagsSink.from_url(target)
    if target.startswith("s3://"):
        from imagemill.core.stores.objects import ObjectStoreSink

        return ObjectStoreSink.from_url(target)
    if target.startswith("file://"):
        from imagemill.core.stores.objects import DirectorySink

        return DirectorySink.from_url(target)
    if "://" in target:
        raise UserError(
            f"sink {target}: expected postgresql://…, s3://bucket/prefix/, file:///dir/, s3tags:// or a .jsonl/.parquet path"
        )
    from imagemill.core.stores.files import open_file_writer

    return open_file_writer(target, keep_existing)
