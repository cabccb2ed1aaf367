"""Record files: JSON Lines (one object per line) and Parquet (pyarrow, typed columns), written by
local runs and read back as RECORDS (`RecordFileReader`; JSONL also gzipped).

Both hold exactly the fields of `Record`; the Parquet schema mirrors it column for column. An
embedding is base64 of little-endian float32 in JSONL and a fixed-size list of float32 (or float16,
IMAGEMILL_EMBEDDING_DTYPE) in Parquet.
"""

import gzip
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from imagemill.core.batching import batched
from imagemill.core.errors import UserError
from imagemill.core.schemas import Record
from imagemill.core.settings import get_settings
from imagemill.core.sinks.base import DEFAULT_BATCH, RECORD_SOURCES, Key, SinkContext, first_error

T = TypeVar("T")

_OWNED = pa.struct([("model", pa.string()), ("revision", pa.string())])

DEDUP_TYPE = pa.struct([("group", pa.string()), ("representative", pa.bool_()), ("threshold", pa.float64())])
_QUALITY = pa.struct(
    [
        ("brightness", pa.float64()),
        ("contrast", pa.float64()),
        ("blur", pa.float64()),
        ("entropy", pa.float64()),
        ("low_information", pa.bool_()),
    ]
)

_BASE_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("etag", pa.string()),
        ("bytes", pa.int64()),
        ("image", pa.struct([("width", pa.int32()), ("height", pa.int32()), ("format", pa.string())])),
        ("caption", pa.struct([*_OWNED, ("text", pa.string()), ("prompt", pa.string())])),
        ("moderation", pa.struct([*_OWNED, ("flagged", pa.bool_()), ("scores", pa.map_(pa.string(), pa.float64()))])),
        (
            "tags",
            pa.struct([*_OWNED, ("labels", pa.list_(pa.struct([("tag", pa.string()), ("score", pa.float64())])))]),
        ),
        ("error", pa.struct([("kind", pa.string()), ("message", pa.string())])),
        ("signature", pa.string()),
        ("job_id", pa.string()),
        ("timings", pa.struct([("fetch_ms", pa.float64()), ("decode_ms", pa.float64()), ("infer_ms", pa.float64())])),
        ("processed_at", pa.timestamp("us", tz="UTC")),
        # each task's options as canonical JSON text (their keys differ by task and model); the same
        # text on every row of a run, so dictionary encoding stores it once
        ("task_options", pa.string()),
        ("scores", pa.map_(pa.string(), pa.float64())),  # probes' scores by name (`imagemill score`)
        # the decoded picture's statistics (IMAGEMILL_IMAGE_QUALITY)
        ("quality", _QUALITY),
        # dedup's group and role (`imagemill dedup --write-back`)
        ("dedup", DEDUP_TYPE),
    ]
)
EMBEDDING_TYPES = {"float32": pa.float32(), "float16": pa.float16()}
# rows held back while no record has shown the embedding's dimension (the schema needs it)
HOLD_ROWS = 16_384


def parquet_schema(dim: int | None = None, embedding_dtype: str = "float32") -> pa.Schema:
    """The records' Parquet schema; the embedding vector a fixed-size list of `dim` values (of
    `embedding_dtype`), or a plain list when no record shows the dimension (no embeddings at all)."""
    values = EMBEDDING_TYPES[embedding_dtype]
    vector = pa.list_(values, dim) if dim else pa.list_(values)
    embedding = pa.struct([*_OWNED, ("dim", pa.int32()), ("vector", vector)])
    # after the task columns, before error: the order of `Record`'s fields
    return _BASE_SCHEMA.insert(_BASE_SCHEMA.get_field_index("error"), pa.field("embedding", embedding))


PARQUET_SCHEMA = parquet_schema()
# the embedding's floats: one leaf column of every vector's values, end to end
VECTOR_COLUMN = "embedding.vector.list.element"


def writer_options(schema: pa.Schema) -> dict[str, Any]:
    """How records are written to Parquet: zstd, every column dictionary-encoded where that pays,
    but the embedding's floats byte-stream-split instead. Random-looking floats never fit a
    dictionary (trying costs time and reading the fallback pages costs more); split into byte
    planes they compress about 10 % better and decode about five times faster (a million 512-d
    vectors: ~1.9 GB, the bulk of what retag, export and dedup read)."""
    columns = [path for field in schema for path in _leaf_paths(field.name, field.type)]
    if VECTOR_COLUMN not in columns:
        return {"compression": "zstd"}
    return {
        "compression": "zstd",
        "use_dictionary": [path for path in columns if path != VECTOR_COLUMN],
        "column_encoding": {VECTOR_COLUMN: "BYTE_STREAM_SPLIT"},
    }


def _leaf_paths(name: str, kind: pa.DataType) -> list[str]:
    # Parquet's dotted column paths, as pyarrow writes nested types (compliant: `list.element`, `key_value`)
    if pa.types.is_struct(kind):
        return [path for child in kind for path in _leaf_paths(f"{name}.{child.name}", child.type)]
    if pa.types.is_map(kind):
        entries = f"{name}.key_value"
        return [*_leaf_paths(f"{entries}.key", kind.key_type), *_leaf_paths(f"{entries}.value", kind.item_type)]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _leaf_paths(f"{name}.list.element", kind.value_type)
    return [name]


SUFFIXES = (".jsonl", ".parquet")


class RecordFile(SinkContext):
    """A local run's output file (an `IncrementalSink`), written beside the target and moved into
    place on close; `with` closes on success and aborts on error, leaving the earlier file as it was.

    With `keep_existing`, the error-free records of an earlier run are remembered; `existing_keys`
    names them and `keep` copies those still wanted, so an incremental run redoes only the rest
    and the file still holds one record per image of the current source."""

    def __init__(self, path: Path, keep_existing: bool) -> None:
        self.path = path
        self.partial = path.with_name(f".{path.name}.partial")
        self._previous: dict[Key, Record] = {}
        if keep_existing and path.exists():
            self._previous = {r.key: r for r in iter_records(path) if r.error is None}
        self._open()

    def existing_keys(self, keys: Iterable[Key]) -> set[Key]:
        return {key for key in keys if key in self._previous}

    def keep(self, keys: Iterable[Key]) -> None:
        """Write the earlier records of these keys again, as they were."""
        self.write([self._previous.pop(key) for key in keys if key in self._previous])

    def check(self) -> None:
        """Opened when made: nothing more to check."""

    def close(self) -> None:
        """The run completed: the new file replaces the old one."""
        self._close()
        os.replace(self.partial, self.path)

    def abort(self) -> Path:
        """The run failed: the old file stays as it was; what was written is left beside it."""
        self._close()
        return self.partial

    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def write(self, records: Sequence[Record], chunk: str = "") -> None:
        raise NotImplementedError


class JsonlSink(RecordFile):
    """One JSON object per line, flushed per batch."""

    def _open(self) -> None:
        self._handle: IO[bytes] = self.partial.open("wb")

    def write(self, records: Sequence[Record], chunk: str = "") -> None:
        self._handle.writelines(record.__pydantic_serializer__.to_json(record) + b"\n" for record in records)
        self._handle.flush()

    def write_rows(self, rows: Iterable[dict[str, Any]]) -> None:
        """Records as JSON objects already (a pass that builds no record objects, such as retag's
        over a JSONL file), written as `write` writes records: compact, UTF-8 (orjson: a third of
        the standard library's time, which is most of such a pass)."""
        self._handle.writelines(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE) for row in rows)
        self._handle.flush()

    def append(self, part: Path) -> None:
        """The lines of `part` (written by another process, as `write_rows` writes them) added as
        they are: copied by the kernel (no pass through this process: a part is hundreds of MB),
        or read and written where the file system cannot."""
        self._handle.flush()
        with part.open("rb") as source:
            size, copied = os.fstat(source.fileno()).st_size, 0
            into = self._handle.fileno()
            try:
                while copied < size and (n := os.copy_file_range(source.fileno(), into, size - copied)):
                    copied += n
            except OSError:  # not between these file systems, or not on this kernel
                pass
            self._handle.seek(0, os.SEEK_END)  # the buffered file's position after the kernel's writes
            if copied < size:
                source.seek(copied)
                shutil.copyfileobj(source, self._handle, JSONL_BUFFER)
        self._handle.flush()

    def _close(self) -> None:
        self._handle.close()


class ParquetSink(RecordFile):
    """Typed columns, buffered into row groups of `ROW_GROUP` rows. The file is begun at the first
    row group that holds an embedding (its schema fixes the vector's length), or once `HOLD_ROWS`
    rows have none (a plain list then), or at close."""

    ROW_GROUP = 4096

    def __init__(self, path: Path, keep_existing: bool, embedding_dtype: str | None = None) -> None:
        self.embedding_dtype = embedding_dtype or get_settings().embedding_dtype
        super().__init__(path, keep_existing)

    def _open(self) -> None:
        self._writer: pq.ParquetWriter | None = None
        self._buffer: list[dict[str, Any]] = []
        self._dim: int | None = None

    def write(self, records: Sequence[Record], chunk: str = "") -> None:
        for record in records:
            self._dim = self._dim or (record.embedding.dim if record.embedding else None)
            self._buffer.append(parquet_row(record, self.embedding_dtype))
        if len(self._buffer) >= self.ROW_GROUP:
            self._flush(final=False)

    def _flush(self, final: bool = True) -> None:
        if self._writer is None:
            if self._dim is None and not final and len(self._buffer) < HOLD_ROWS:
                return
            schema = parquet_schema(self._dim, self.embedding_dtype)
            self._writer = pq.ParquetWriter(self.partial, schema, **writer_options(schema))
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self._writer.schema))
            self._buffer = []

    def _close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()

    def write_table(self, table: pa.Table) -> None:
        """Rows already in this format's columns (a columnar pass, such as retag's over a records
        Parquet file), written as they are; the first table's schema becomes the file's. Not to be
        mixed with `write` in one file."""
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.partial, table.schema, **writer_options(table.schema))
        self._writer.write_table(table)


def parquet_row(record: Record, embedding_dtype: str = "float32") -> dict[str, Any]:
    row = record.model_dump(mode="python")
    if record.embedding:
        # a numpy array of the column's own type: pyarrow takes float16 values only as np.float16
        row["embedding"]["vector"] = record.embedding.array().astype(embedding_dtype, copy=False)
    if row.get("moderation"):
        row["moderation"]["scores"] = list(row["moderation"]["scores"].items())
    if row.get("error"):
        row["error"]["kind"] = str(row["error"]["kind"])
    if row.get("task_options") is not None:
        row["task_options"] = options_text(row["task_options"])
    if row.get("scores") is not None:
        row["scores"] = list(row["scores"].items())
    return row


def options_text(options: dict[str, Any]) -> str:
    """A record's `task_options` as the Parquet column holds them: canonical JSON."""
    return json.dumps(options, sort_keys=True, separators=(",", ":"))


def parquet_record(row: dict[str, Any]) -> Record:
    """The inverse of `parquet_row`: one row of a Parquet file (as pyarrow's `to_pylist` gives it) as a record."""
    # Parquet has no dict type: the map column comes back as (key, value) pairs
    if row.get("moderation"):
        row["moderation"]["scores"] = dict(row["moderation"]["scores"])
    if isinstance(row.get("task_options"), str):
        row["task_options"] = json.loads(row["task_options"])
    if isinstance(row.get("scores"), list):
        row["scores"] = dict(row["scores"])
    return Record.model_validate(row)


def iter_records(path: Path) -> Iterator[Record]:
    """Stream the records of a JSONL or Parquet file, a batch at a time."""
    if path.suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from map(parquet_record, batch.to_pylist())
        return
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield Record.model_validate(json.loads(line))


def read_records(path: Path) -> list[Record]:
    """Read back a JSONL or Parquet file of records."""
    return list(iter_records(path))


def open_file_sink(target: str, keep_existing: bool = False, embedding_dtype: str | None = None) -> RecordFile:
    """A JSONL or Parquet sink by the target's suffix; UserError for another suffix or a missing folder.

    `embedding_dtype` (float32 or float16) types a Parquet file's embedding column; by default the
    environment's IMAGEMILL_EMBEDDING_DTYPE."""
    path = Path(target)
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"--out {target}: the file name must end in .jsonl or .parquet")
    if not path.parent.is_dir():
        raise UserError(f"--out {target}: folder {path.parent} does not exist")
    if path.suffix.lower() == ".parquet":
        return ParquetSink(path, keep_existing, embedding_dtype)
    return JsonlSink(path, keep_existing)


def encode_records(records: Sequence[Record], fmt: str, embedding_dtype: str | None = None) -> bytes:
    """A whole chunk of records as one JSONL or Parquet document (for one-object-per-chunk sinks);
    `embedding_dtype` as for `open_file_sink`."""
    if fmt == "jsonl":
        return "".join(record.model_dump_json() + "\n" for record in records).encode()
    if fmt == "parquet":
        sink = pa.BufferOutputStream()
        dtype = embedding_dtype or get_settings().embedding_dtype
        dim = next((r.embedding.dim for r in records if r.embedding), None)
        table = pa.Table.from_pylist([parquet_row(r, dtype) for r in records], schema=parquet_schema(dim, dtype))
        pq.write_table(table, sink, **writer_options(table.schema))
        data: bytes = sink.getvalue().to_pybytes()
        return data
    raise ValueError(f"unknown record format {fmt!r}; expected jsonl or parquet")


def decode_records(data: bytes, fmt: str) -> list[Record]:
    """The inverse of `encode_records`: one JSONL or Parquet document back into records."""
    if fmt == "jsonl":
        return [Record.model_validate_json(line) for line in data.splitlines() if line.strip()]
    if fmt == "parquet":
        return [parquet_record(row) for row in pq.read_table(pa.BufferReader(data)).to_pylist()]
    raise ValueError(f"unknown record format {fmt!r}; expected jsonl or parquet")


# -- read back as RECORDS ---------------------------------------------------------------------------


def record_file_kind(path: Path) -> str | None:
    """`jsonl`, `jsonl.gz` or `parquet` by the file's name; None for any other name."""
    name = path.name.lower()
    for kind in ("jsonl.gz", "jsonl", "parquet"):
        if name.endswith("." + kind):
            return kind
    return None


class RecordFileReader:
    """A records file read back as RECORDS (a `ReadableSink`): a file holds what the run that wrote
    it left, one record per image of its source (a local run keeps its output current), so the
    current set and the history are both the whole file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self, *, history: bool = False, batch_size: int = DEFAULT_BATCH) -> Iterator[list[Record]]:
        """The file's records in lists of at most `batch_size`; UserError (one line) for a file that
        cannot be read, checked before the first batch is asked for so a bad argument fails at once."""
        path = self.path
        kind = record_file_kind(path)
        if kind is None:
            raise UserError(f"RECORDS {path}: expected {RECORD_SOURCES}")
        if not path.is_file():
            raise UserError(f"RECORDS {path}: no such file")
        if kind == "parquet":
            parquet = _open_parquet(path)
            return _guarded(path, batched(_parquet_records(parquet, batch_size), batch_size))
        return _guarded(path, batched(_jsonl_records(path, kind == "jsonl.gz"), batch_size))


def json_rows(
    source: str, batch_size: int = DEFAULT_BATCH, lines: tuple[int, int] | None = None
) -> Iterator[list[dict[str, Any]]]:
    """A JSONL (or .jsonl.gz) records file as JSON objects in lists of at most `batch_size`, for a
    pass that builds no record objects (they are not validated here: the caller validates what it
    cannot use as it is). With `lines` (a plain JSONL file's byte range from `line_ranges`), only
    the lines that begin in it. UserError (one line) for a file that cannot be read or a line that
    is no JSON object (its line number in the whole file)."""
    path = Path(source)
    kind = record_file_kind(path)
    if kind not in ("jsonl", "jsonl.gz") or not path.is_file():
        raise UserError(f"RECORDS {path}: no such JSONL file")
    if lines is not None and kind != "jsonl":
        raise ValueError("a byte range of a gzipped file")
    return _guarded(path, batched(_json_objects(path, kind == "jsonl.gz", lines), batch_size))


def line_ranges(source: str, parts: int) -> list[tuple[int, int]]:
    """A plain JSONL file cut into at most `parts` byte ranges of about equal size, each beginning
    at a line's start (for `json_rows`): together they hold every line once, in order."""
    path = Path(source)
    size = path.stat().st_size
    starts = [0]
    with path.open("rb") as handle:
        for part in range(1, parts):
            handle.seek(max(size * part // parts - 1, starts[-1]))
            handle.readline()  # the rest of the line the cut falls in (the cut's byte itself may end one)
            if handle.tell() < size and handle.tell() > starts[-1]:
                starts.append(handle.tell())
    return list(zip(starts, [*starts[1:], size], strict=True))


# read buffer of a JSONL file: a record's line (several KB with its embedding) takes one of 8 KB,
# the default, a read call each; 1 MB cuts splitting the file into lines to a quarter
JSONL_BUFFER = 1 << 20


def _json_objects(path: Path, gzipped: bool, lines: tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
    start, stop = lines or (0, None)
    with gzip.open(path, "rb") if gzipped else path.open("rb", buffering=JSONL_BUFFER) as handle:
        handle.seek(start)
        at = start
        for number, line in enumerate(handle, start=1):
            if stop is not None and at >= stop:
                break
            at += len(line)
            if line.isspace():
                continue
            try:
                row = orjson.loads(line)  # UTF-8 checked by it; a third of json's time
            except orjson.JSONDecodeError as exc:
                where = number + _lines_before(path, start)
                raise UserError(f"RECORDS {path}: line {where} is not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                where = number + _lines_before(path, start)
                raise UserError(f"RECORDS {path}: line {where} is not a record (not a JSON object)")
            yield row


def _lines_before(path: Path, offset: int) -> int:
    """How many lines a plain file holds before `offset` (a line's start): read only for an error."""
    if not offset:
        return 0
    count = 0
    with path.open("rb") as handle:
        while offset > 0 and (block := handle.read(min(JSONL_BUFFER, offset))):
            count += block.count(b"\n")
            offset -= len(block)
    return count


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
    """How many records reading RECORDS `source` gives, when that is known without reading them all
    (a Parquet file's metadata); None otherwise."""
    path = Path(source)
    if "://" in source or record_file_kind(path) != "parquet" or not path.is_file():
        return None
    return int(_open_parquet(path).metadata.num_rows)


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"RECORDS {path}: not a Parquet file ({exc})") from None


def _parquet_records(parquet: pq.ParquetFile, batch_size: int) -> Iterator[Record]:
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
                raise UserError(f"RECORDS {path}: line {number} is not a record ({first_error(exc)})") from None


def _guarded(path: Path, records: Iterator[T]) -> Iterator[T]:
    # a file that breaks half-way (truncated, corrupt) is the user's to fix: one line, not a traceback
    try:
        yield from records
    except (pa.ArrowException, OSError, EOFError) as exc:
        raise UserError(f"RECORDS {path}: cannot be read ({exc})") from None
    except ValidationError as exc:
        raise UserError(f"RECORDS {path}: holds a row that is not a record ({first_error(exc)})") from None
