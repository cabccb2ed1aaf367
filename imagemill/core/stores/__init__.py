"""Results stores: where records go, side by side behind one interface (`RecordWriter`, in `base`).

Files (JSONL, Parquet), PostgreSQL, and one object per chunk on S3; every write is idempotent by
record key (uri, etag, signature) or by chunk name, so a redelivered chunk replaces itself.
"""

from typing import TYPE_CHECKING

from imagemill.core.errors import UserError
from imagemill.core.redaction import redact_url
from imagemill.core.stores.base import (
    IncrementalWriter,
    Key,
    KeyedStore,
    ListingMarks,
    MarksDeleted,
    PrefixListing,
    RecordWriter,
    SearchableStore,
    SelectiveStore,
    WriterContext,
)

if TYPE_CHECKING:
    from imagemill.core.stores.files import RecordFile

__all__ = [
    "IncrementalWriter",
    "Key",
    "KeyedStore",
    "ListingMarks",
    "MarksDeleted",
    "PrefixListing",
    "RecordWriter",
    "SearchableStore",
    "SelectiveStore",
    "WriterContext",
    "open_file_writer",
    "open_writer",
]

SINK_SCHEMES = "postgresql://…, s3://bucket/prefix/, file:///dir/, s3tags:// or a .jsonl/.parquet path"


def open_writer(target: str, keep_existing: bool = False) -> RecordWriter:
    """The writer for a sink URL or `--out` path: postgresql://…, s3://bucket/prefix/,
    file:///shared/dir/ (one file per chunk), s3tags:// (results as tags on each record's own
    S3 object), or a *.jsonl / *.parquet file (local mode; `open_file_writer` types it precisely).

    Capabilities beyond `RecordWriter` are checked with isinstance: `KeyedStore`, `SearchableStore`,
    `MarksDeleted`."""
    # each store's driver (psycopg, boto3, pyarrow) is imported only when that store is used
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
        raise UserError(f"sink {redact_url(target)}: expected {SINK_SCHEMES}")
    return open_file_writer(target, keep_existing)


def open_file_writer(target: str, keep_existing: bool = False, embedding_dtype: str | None = None) -> "RecordFile":
    """Local mode's `--out` file (*.jsonl or *.parquet): an `IncrementalWriter` that writes beside
    the target and replaces it on close; `abort` leaves the earlier file as it was. `embedding_dtype`
    types a Parquet embedding column (default: IMAGEMILL_EMBEDDING_DTYPE)."""
    from imagemill.core.stores import files  # pyarrow, only for a run that writes a file

    return files.open_file_writer(target, keep_existing, embedding_dtype)
