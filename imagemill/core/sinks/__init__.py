"""Sinks: where records go, side by side behind one interface (`Sink`, in `base`).

Files (JSONL, Parquet), PostgreSQL, and one object per chunk on S3; every write is idempotent by
record key (uri, etag, signature) or by chunk name, so a redelivered chunk replaces itself.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from imagemill.core.errors import UserError
from imagemill.core.redaction import redact_url
from imagemill.core.schemas import Record
from imagemill.core.sinks.base import (
    DEFAULT_BATCH,
    RECORD_SOURCES,
    IncrementalSink,
    Key,
    KeyedSink,
    ListingMarks,
    MarksDeleted,
    ObjectChange,
    PrefixListing,
    ReadableSink,
    SearchableSink,
    SelectiveSink,
    Sink,
    SinkContext,
)

if TYPE_CHECKING:
    from imagemill.core.sinks.files import RecordFile

__all__ = [
    "IncrementalSink",
    "Key",
    "KeyedSink",
    "ListingMarks",
    "MarksDeleted",
    "ObjectChange",
    "PrefixListing",
    "ReadableSink",
    "SearchableSink",
    "SelectiveSink",
    "Sink",
    "SinkContext",
    "open_file_sink",
    "open_readable",
    "open_sink",
    "read_records",
]

SINK_SCHEMES = "postgresql://…, s3://bucket/prefix/, file:///dir/, s3tags:// or a .jsonl/.parquet path"


def open_sink(target: str, keep_existing: bool = False) -> Sink:
    """The sink for a sink URL or `--out` path: postgresql://…, s3://bucket/prefix/,
    file:///shared/dir/ (one file per chunk), s3tags:// (results as tags on each record's own
    S3 object), or a *.jsonl / *.parquet file (local mode; `open_file_sink` types it precisely).

    Capabilities beyond `Sink` are checked with isinstance: `KeyedSink`, `SearchableSink`,
    `MarksDeleted`."""
    # each sink's driver (psycopg, boto3, pyarrow) is imported only when that sink is used
    if target.startswith(("postgresql://", "postgres://")):
        from imagemill.core.sinks.postgres import PostgresSink  # psycopg, for this sink only

        return PostgresSink(target)
    if target.startswith("s3tags://"):
        from imagemill.core.sinks.s3tags import ObjectTagsSink  # boto3, for this sink only

        return ObjectTagsSink.from_url(target)
    if target.startswith("s3://"):
        from imagemill.core.sinks.objects import ObjectStoreSink  # boto3 and pyarrow, for this sink only

        return ObjectStoreSink.from_url(target)
    if target.startswith("file://"):
        from imagemill.core.sinks.objects import DirectorySink  # pyarrow, for this sink only

        return DirectorySink.from_url(target)
    if "://" in target:
        raise UserError(f"sink {redact_url(target)}: expected {SINK_SCHEMES}")
    return open_file_sink(target, keep_existing)


def open_file_sink(target: str, keep_existing: bool = False, embedding_dtype: str | None = None) -> "RecordFile":
    """Local mode's `--out` file (*.jsonl or *.parquet): an `IncrementalSink` that writes beside
    the target and replaces it on close; `abort` leaves the earlier file as it was. `embedding_dtype`
    types a Parquet embedding column (default: IMAGEMILL_EMBEDDING_DTYPE)."""
    from imagemill.core.sinks import files  # pyarrow, only for a run that writes a file

    return files.open_file_sink(target, keep_existing, embedding_dtype)


def open_readable(source: str) -> ReadableSink:
    """What a RECORDS argument (retag, export, dedup) names, to read back: a `.jsonl`, `.jsonl.gz` or
    `.parquet` file, a postgresql:// sink, or an object sink's prefix (s3://bucket/prefix/,
    file:///dir/). UserError, one line, for anything else."""
    # each sink's driver (psycopg, boto3, pyarrow) is imported only when that sink is read
    if source.startswith(("postgresql://", "postgres://")):
        from imagemill.core.sinks.postgres import PostgresSink  # psycopg, for this sink only

        return PostgresSink(source)
    if source.startswith("s3://"):
        from imagemill.core.sinks.objects import ObjectStoreSink  # boto3 and pyarrow, for this sink only

        return ObjectStoreSink.from_url(source)
    if source.startswith("file://"):
        from imagemill.core.sinks.objects import DirectorySink  # pyarrow, for this sink only

        return DirectorySink.from_url(source)
    if "://" in source:
        raise UserError(f"RECORDS {redact_url(source)}: expected {RECORD_SOURCES}")
    from imagemill.core.sinks.files import RecordFileReader  # pyarrow, for a records file only

    return RecordFileReader(Path(source))


def read_records(source: str, *, history: bool = False, batch_size: int = DEFAULT_BATCH) -> Iterator[list[Record]]:
    """The records of a RECORDS argument, in lists of at most `batch_size`; only the current set
    unless `history`. UserError (one line) for a source that cannot be read."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    return open_readable(source).read(history=history, batch_size=batch_size)
