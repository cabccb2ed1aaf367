"""Record files: JSON Lines (one object per line) and Parquet (pyarrow, typed columns).

Both hold exactly the fields of `Record`; the Parquet schema mirrors it column for column.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

from imagemill.errors import UserError
from imagemill.schemas import Record

_OWNED = pa.struct([("model", pa.string()), ("revision", pa.string())])

PARQUET_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("etag", pa.string()),
        ("bytes", pa.int64()),
        ("image", pa.struct([("width", pa.int32()), ("height", pa.int32()), ("format", pa.string())])),
        ("caption", pa.struct([*_OWNED, ("text", pa.string())])),
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
    ]
)
SUFFIXES = (".jsonl", ".parquet")


class JsonlWriter:
    """Appends one JSON object per record and flushes per batch, so a crash keeps what was done.

    A streaming file for one local run: chunks are appended, not replaced."""

    def __init__(self, path: Path) -> None:
        self._handle: IO[str] = path.open("w", encoding="utf-8")

    def write(self, records: Sequence[Record], chunk: str = "") -> None:
        self._handle.writelines(record.model_dump_json() + "\n" for record in records)
        self._handle.flush()

    def check(self) -> None:
        """Opened when made: nothing more to check."""

    def close(self) -> None:
        self._handle.close()


class ParquetWriter:
    """Buffers records into row groups of `row_group` rows."""

    def __init__(self, path: Path, row_group: int = 4096) -> None:
        self._writer = pq.ParquetWriter(path, PARQUET_SCHEMA, compression="zstd")
        self._buffer: list[dict] = []
        self._row_group = row_group

    def write(self, records: Sequence[Record], chunk: str = "") -> None:
        self._buffer.extend(parquet_row(record) for record in records)
        if len(self._buffer) >= self._row_group:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=PARQUET_SCHEMA))
            self._buffer = []

    def check(self) -> None:
        """Opened when made: nothing more to check."""

    def close(self) -> None:
        self._flush()
        self._writer.close()


def parquet_row(record: Record) -> dict:
    row = record.model_dump(mode="python")
    if row.get("moderation"):
        row["moderation"]["scores"] = list(row["moderation"]["scores"].items())
    if row.get("error"):
        row["error"]["kind"] = str(row["error"]["kind"])
    return row


def read_records(path: Path) -> list[Record]:
    """Read back a JSONL or Parquet file of records (tests and incremental runs use it)."""
    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
        for row in rows:
            if row.get("moderation"):
                row["moderation"]["scores"] = dict(row["moderation"]["scores"])
        return [Record.model_validate(row) for row in rows]
    with path.open(encoding="utf-8") as handle:
        return [Record.model_validate(json.loads(line)) for line in handle if line.strip()]


def open_file_writer(target: str) -> JsonlWriter | ParquetWriter:
    path = Path(target)
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"--out {target}: the file name must end in .jsonl or .parquet")
    if not path.parent.is_dir():
        raise UserError(f"--out {target}: folder {path.parent} does not exist")
    if path.suffix.lower() == ".parquet":
        return ParquetWriter(path)
    return JsonlWriter(path)


def encode_records(records: Sequence[Record], fmt: str) -> bytes:
    """A whole chunk of records as one JSONL or Parquet document (for one-object-per-chunk sinks)."""
    if fmt == "jsonl":
        return "".join(record.model_dump_json() + "\n" for record in records).encode()
    if fmt == "parquet":
        sink = pa.BufferOutputStream()
        table = pa.Table.from_pylist([parquet_row(r) for r in records], schema=PARQUET_SCHEMA)
        pq.write_table(table, sink, compression="zstd")
        return sink.getvalue().to_pybytes()
    raise ValueError(f"unknown record format {fmt!r}; expected jsonl or parquet")


def decode_records(data: bytes, fmt: str) -> list[Record]:
    """The inverse of `encode_records`: one JSONL or Parquet document back into records."""
    if fmt == "jsonl":
        return [Record.model_validate_json(line) for line in data.splitlines() if line.strip()]
    if fmt == "parquet":
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
        for row in rows:
            # Parquet has no dict type: the map column comes back as (key, value) pairs
            if row.get("moderation"):
                row["moderation"]["scores"] = dict(row["moderation"]["scores"])
        return [Record.model_validate(row) for row in rows]
    raise ValueError(f"unknown record format {fmt!r}; expected jsonl or parquet")
