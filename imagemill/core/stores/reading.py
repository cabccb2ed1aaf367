"""Reading records back for the commands that work from them (retag, export, dedup): one RECORDS
argument, streamed in batches, whatever store wrote it.

A RECORDS argument is a `.jsonl`, `.jsonl.gz` or `.parquet` file, a `postgresql://` store, or an
object sink's prefix (`s3://bucket/prefix/`, `file:///dir/`). By default it reads the current set
(one record per image as it is now), with `history=True` every record kept:

- a file holds what the run that wrote it left: one record per image of its source (a local run
  keeps its output current), so both read the whole file;
- PostgreSQL: the view `imagemill_current` (`<table>_current` with `?table=`), or the table itself
  for history; one server-side cursor in one read-only snapshot, so rows written while reading
  (retag's own new rows) are never read back;
- object sinks hold append-only history per job; their current set is the newest record per uri
  (by `processed_at`, then by chunk name), found in two passes: the first keeps 32 bytes per record
  (a 128-bit hash of the uri, the time, and where the record is), the second reads the winners.
"""

import gzip
import hashlib
import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from imagemill.core.errors import UserError
from imagemill.core.redaction import redact_url, scrub_secret
from imagemill.core.schemas import Record

T = TypeVar("T")
RECORD_SOURCES = "a .jsonl/.jsonl.gz/.parquet file, postgresql://…, s3://bucket/prefix/ or file:///dir/"
DEFAULT_BATCH = 4096
# one snapshot cursor per read; the name only has to be unique on its connection
_CURSOR = "imagemill_read_records"
# without a timeout libpq waits for the kernel (minutes) on an unreachable host
_CONNECT: dict[str, Any] = {"connect_timeout": 10, "application_name": "imagemill"}


class ChunkReader(Protocol):
    """An object sink read back chunk by chunk (`ObjectStoreSink`, `DirectorySink`)."""

    def chunk_names(self, prefix_within: str = "") -> Iterator[str]: ...

    def chunk_bytes(self, name: str) -> bytes: ...


def read_records(source: str, *, history: bool = False, batch_size: int = DEFAULT_BATCH) -> Iterator[list[Record]]:
    """The records of a RECORDS argument, in lists of at most `batch_size`; only the current set
    unless `history`. UserError (one line) for a source that cannot be read."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if source.startswith(("postgresql://", "postgres://")):
        return _postgres_records(source, history, batch_size)
    if source.startswith(("s3://", "file://")):
        return _sink_records(source, history, batch_size)
    if "://" in source:
        raise UserError(f"RECORDS {redact_url(source)}: expected {RECORD_SOURCES}")
    return _file_records(Path(source), batch_size)


def parquet_batches(source: str, batch_size: int = DEFAULT_BATCH) -> Iterator[pa.RecordBatch]:
    """A records Parquet file as Arrow batches, for a columnar pass that builds no record objects;
    UserError (one line) for a file that cannot be read."""
    path = Path(source)
    if record_file_kind(path) != "parquet" or not path.is_file():
        raise UserError(f"RECORDS {path}: no such Parquet file")
    parquet = _open_parquet(path)
    return _guarded(path, row_group_batches(parquet, batch_size))


def row_group_batches(parquet: pq.ParquetFile, batch_size: int) -> Iterator[pa.RecordBatch]:
    """The file's rows in batches of at most `batch_size`, through one reader per row group: one
    reader over the whole file keeps every row group's nested column buffers (an embedding's
    fixed-size list) allocated until it ends — a whole 2 GB file in memory by the last batch
    (pyarrow 26; `pa.total_allocated_bytes()` shows it) — while a reader per row group frees them."""
    for group in range(parquet.num_row_groups):
        yield from parquet.iter_batches(batch_size=batch_size, row_groups=[group])


def count_records(source: str) -> int | None:
    """How many records `read_records` will give, when that is known without reading them all
    (a Parquet file's metadata); None otherwise."""
    path = Path(source)
    if "://" in source or record_file_kind(path) != "parquet" or not path.is_file():
        return None
    return int(_open_parquet(path).metadata.num_rows)


def batches(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    """Lists of at most `size` records, in order (itertools.batched arrives only in Python 3.12)."""
    iterator = iter(records)
    while batch := list(islice(iterator, size)):
        yield batch


# -- files ------------------------------------------------------------------------------------------


def record_file_kind(path: Path) -> str | None:
    """`jsonl`, `jsonl.gz` or `parquet` by the file's name; None for any other name."""
    name = path.name.lower()
    for kind in ("jsonl.gz", "jsonl", "parquet"):
        if name.endswith("." + kind):
            return kind
    return None


def _file_records(path: Path, batch_size: int) -> Iterator[list[Record]]:
    kind = record_file_kind(path)
    if kind is None:
        raise UserError(f"RECORDS {path}: expected {RECORD_SOURCES}")
    if not path.is_file():
        raise UserError(f"RECORDS {path}: no such file")
    # checked before the first batch is asked for, so a bad argument fails when the command starts
    if kind == "parquet":
        parquet = _open_parquet(path)
        return _guarded(path, batches(_parquet_records(parquet, batch_size), batch_size))
    return _guarded(path, batches(_jsonl_records(path, kind == "jsonl.gz"), batch_size))


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"RECORDS {path}: not a Parquet file ({exc})") from None


def _parquet_records(parquet: pq.ParquetFile, batch_size: int) -> Iterator[Record]:
    from imagemill.core.stores.files import parquet_record

    # one batch at a time: a file of millions of records is never read whole
    for batch in row_group_batches(parquet, batch_size):
        for row in batch.to_pylist():
            yield parquet_record(row)


def _jsonl_records(path: Path, gzipped: bool) -> Iterator[Record]:
    opener = gzip.open if gzipped else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield Record.model_validate_json(line)
            except ValidationError as exc:
                raise UserError(f"RECORDS {path}: line {number} is not a record ({_first_error(exc)})") from None


def _guarded(path: Path, records: Iterator[T]) -> Iterator[T]:
    # a file that breaks half-way (truncated, corrupt) is the user's to fix: one line, not a traceback
    try:
        yield from records
    except (pa.ArrowException, OSError, EOFError) as exc:
        raise UserError(f"RECORDS {path}: cannot be read ({exc})") from None
    except ValidationError as exc:
        raise UserError(f"RECORDS {path}: holds a row that is not a record ({_first_error(exc)})") from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "record"
    return f"{where}: {error['msg']}"


# -- PostgreSQL -------------------------------------------------------------------------------------


def _postgres_records(url: str, history: bool, batch_size: int) -> Iterator[list[Record]]:
    import psycopg

    from imagemill.core.stores.postgres import PostgresStore, current_view, split_table

    conninfo, table = split_table(url)
    try:
        with psycopg.connect(conninfo, autocommit=True, **_CONNECT) as conn:
            found = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
    except psycopg.Error as exc:
        raise UserError(f"RECORDS {redact_url(url)}: cannot read it ({_reason(exc, url)})") from None
    if found == (None,):
        raise UserError(f"RECORDS {redact_url(url)}: the database has no table {table}")
    # the table exists: opening it as a store checks its schema version and migrates an older one
    with PostgresStore(url) as store:
        store.check()
    return _postgres_rows(url, conninfo, table if history else current_view(table), batch_size)


def _postgres_rows(url: str, conninfo: str, relation: str, batch_size: int) -> Iterator[list[Record]]:
    import psycopg
    from psycopg import IsolationLevel, sql

    query = sql.SQL("SELECT record::text FROM {} ORDER BY uri, etag, signature").format(sql.Identifier(relation))
    try:
        with psycopg.connect(conninfo, **_CONNECT) as conn:
            # one snapshot for the whole read: a row written meanwhile (retag writes beside what it
            # reads) is neither read back nor half-seen; the server-side cursor sends a batch at a time
            conn.isolation_level = IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            with conn.cursor(name=_CURSOR) as cursor:
                cursor.execute(query)
                while rows := cursor.fetchmany(batch_size):
                    yield [_stored_record(url, text) for (text,) in rows]
            conn.rollback()
    except psycopg.OperationalError as exc:
        raise UserError(f"RECORDS {redact_url(url)}: reading failed ({_reason(exc, url)})") from None


def _stored_record(url: str, text: str) -> Record:
    try:
        return Record.model_validate_json(text)
    except ValidationError as exc:
        raise UserError(f"RECORDS {redact_url(url)}: holds a row that is not a record ({_first_error(exc)})") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reason(exc: Exception, url: str) -> str:
    # the driver's message may quote the whole URL, password included
    return _one_line(scrub_secret(str(exc), url))


# -- object sinks -----------------------------------------------------------------------------------


def _sink_records(url: str, history: bool, batch_size: int) -> Iterator[list[Record]]:
    sink = _open_sink(url)
    names = list(sink.chunk_names())
    if not names:
        raise UserError(f"RECORDS {url}: no record files under it")
    if history:
        return batches(_all_sink_records(sink, names), batch_size)
    return batches(_current_sink_records(sink, names), batch_size)


def _open_sink(url: str) -> ChunkReader:
    from imagemill.core.stores.objects import DirectorySink, ObjectStoreSink

    if url.startswith("file://"):
        return DirectorySink.from_url(url)
    sink = ObjectStoreSink.from_url(url)
    sink.check()
    return sink


def _decode(sink: ChunkReader, name: str) -> list[Record]:
    from imagemill.core.stores.files import decode_records
    from imagemill.core.stores.objects import format_of

    try:
        return decode_records(sink.chunk_bytes(name), format_of(name) or "jsonl")
    except (ValidationError, ValueError, pa.ArrowException) as exc:
        raise UserError(f"RECORDS {name}: not a record file ({_one_line(str(exc))[:200]})") from None


def _all_sink_records(sink: ChunkReader, names: list[str]) -> Iterator[Record]:
    for name in names:
        yield from _decode(sink, name)


def _current_sink_records(sink: ChunkReader, names: list[str]) -> Iterator[Record]:
    """Pass one: per record a 128-bit uri hash, its time and place (32 bytes, in numpy arrays);
    the newest place per hash wins. Pass two: read each chunk again and keep its winners."""
    hashes: list[np.ndarray] = []
    times: list[np.ndarray] = []
    places: list[np.ndarray] = []
    for index, name in enumerate(names):
        uris, stamps = _chunk_keys(sink, name)
        hashes.append(_uri_hashes(uris))
        times.append(np.asarray(stamps, dtype=np.int64))
        places.append((np.int64(index) << 32) | np.arange(len(uris), dtype=np.int64))
    uri_hash = np.concatenate(hashes)
    stamp = np.concatenate(times)
    place = np.concatenate(places)
    # sorted by uri, then time, then place: the last row of each uri is its newest record
    order = np.lexsort((place, stamp, uri_hash[:, 1], uri_hash[:, 0]))
    sorted_hash = uri_hash[order]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = np.any(sorted_hash[1:] != sorted_hash[:-1], axis=1)
    winners = np.sort(place[order][last])
    del uri_hash, stamp, place, order, sorted_hash, last
    for index, name in enumerate(names):
        start, stop = np.searchsorted(winners, [np.int64(index) << 32, np.int64(index + 1) << 32])
        if start == stop:
            continue
        records = _decode(sink, name)
        for position in winners[start:stop] & 0xFFFFFFFF:
            yield records[int(position)]


def _chunk_keys(sink: ChunkReader, name: str) -> tuple[list[str], list[int]]:
    """A chunk's uris and processed_at (microseconds), in record order, without building records."""
    from imagemill.core.stores.objects import format_of

    data = sink.chunk_bytes(name)
    try:
        if format_of(name) == "parquet":
            table = pq.read_table(pa.BufferReader(data), columns=["uri", "processed_at"])
            stamps = table.column("processed_at").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
            return table.column("uri").to_pylist(), stamps.to_pylist()
        rows = [json.loads(line) for line in data.splitlines() if line.strip()]
        return [row["uri"] for row in rows], [_microseconds(row["processed_at"]) for row in rows]
    except (ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        raise UserError(f"RECORDS {name}: not a record file ({_one_line(str(exc))[:200]})") from None


def _microseconds(text: str) -> int:
    stamp = datetime.fromisoformat(text)
    # integer arithmetic: a float of seconds since 1970 cannot hold every microsecond exactly
    return (stamp.replace(tzinfo=stamp.tzinfo or UTC) - _EPOCH) // timedelta(microseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _uri_hashes(uris: list[str]) -> np.ndarray:
    # 128 bits: for ten million uris the chance that two collide is about 1e-25
    digests = b"".join(hashlib.blake2b(uri.encode(), digest_size=16).digest() for uri in uris)
    return np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2) if uris else np.zeros((0, 2), dtype=np.uint64)
