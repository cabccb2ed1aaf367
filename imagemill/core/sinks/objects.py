"""Chunk sinks: one S3 object, or one file on a shared volume, per chunk of records.

Each chunk's name is deterministic (`{prefix}{chunk}.{format}`), so a redelivered chunk replaces itself.

What they hold is append-only history per job: `{prefix}{job}/{seq}.{format}` has the records that
chunk wrote, and nothing is ever marked deleted or superseded (they are not `MarksDeleted` sinks).
A replaced object's older records stay in older jobs' files; a deleted object's records stay
forever. The current set (per uri, the most recently processed record, less the uris a fresh
listing no longer has) is derived by reading them (`read`): the newest record per uri (by
`processed_at`, then by chunk name), found in two passes, the first keeping 32 bytes per record (a
128-bit hash of the uri, the time, and where the record is), the second reading the winners. The
PostgreSQL sink keeps it as the view `imagemill_current`.
"""

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from imagemill.core.batching import batched
from imagemill.core.errors import UserError
from imagemill.core.images import LazyS3Client, parse_s3
from imagemill.core.schemas import Record
from imagemill.core.settings import Settings
from imagemill.core.sinks.base import DEFAULT_BATCH, SinkContext
from imagemill.core.sinks.files import decode_records, encode_records
from imagemill.core.sinks.options import split_options

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

FORMATS = ("jsonl", "parquet")
CONTENT_TYPES = {"jsonl": "application/x-ndjson", "parquet": "application/vnd.apache.parquet"}
_TEMP_SUFFIX = ".partial"


def check_format(fmt: str) -> None:
    """ValueError unless `fmt` is a record format this module writes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown record format {fmt!r}; expected jsonl or parquet")


def chunk_object_name(chunk: str, fmt: str) -> str:
    """`job-abc/000042` -> `job-abc/000042.jsonl`; refuses names that could escape or alias the prefix."""
    if not chunk:
        raise ValueError("chunk name is empty")
    # empty, '.' and '..' segments would escape the sink's directory or let two names map to one file
    if any(segment in ("", ".", "..") for segment in chunk.split("/")):
        raise ValueError(f"chunk name {chunk!r} must be relative, without '.', '..' or empty path segments")
    if "\\" in chunk or "\0" in chunk:
        raise ValueError(f"chunk name {chunk!r} must not contain backslashes or NUL")
    check_format(fmt)
    return f"{chunk}.{fmt}"


def split_format(url: str) -> tuple[str, str]:
    """`s3://b/out/?format=parquet` -> (`s3://b/out/`, `parquet`); jsonl when no query is given."""
    base, options = split_options(url, {"format": "|".join(FORMATS)})
    fmt = options.get("format", "jsonl").lower()
    if fmt not in FORMATS:
        raise UserError(f"sink {url}: format must be jsonl or parquet, not {fmt!r}")
    return base, fmt


def normalise_prefix(prefix: str) -> str:
    """`out` and `out/` both mean the folder `out/`; an empty prefix is the bucket's root."""
    stripped = prefix.strip("/")
    return f"{stripped}/" if stripped else ""


def format_of(name: str) -> str | None:
    """`job/000001.parquet` -> `parquet`; None for a name that is not a chunk (a marker, a temporary file)."""
    suffix = name.rpartition(".")[2]
    return suffix if suffix in FORMATS else None


class ChunkReads:
    """Reading an object sink back, chunk by chunk: every record, a job's failed ones, or RECORDS
    (`ReadableSink`). A sink that mixes it in names its chunks and gives each one's bytes."""

    fmt: str
    url: str  # as given (`from_url`), for messages

    def chunk_names(self, prefix_within: str = "") -> Iterator[str]:
        raise NotImplementedError

    def chunk_bytes(self, name: str) -> bytes:
        raise NotImplementedError

    def check(self) -> None:
        raise NotImplementedError

    def read_all(self, prefix_within: str = "") -> list[Record]:
        """Every record in every chunk whose name starts with `prefix_within`, decoded by each one's own suffix."""
        records: list[Record] = []
        for name in self.chunk_names(prefix_within):
            records.extend(decode_records(self.chunk_bytes(name), format_of(name) or self.fmt))
        return records

    def failed_records(self, job_id: str) -> list[Record]:
        """The job's records that carry an error (for `imagemill retry`)."""
        return [record for record in self.read_all(job_id + "/") if record.error]

    def read(self, *, history: bool = False, batch_size: int = DEFAULT_BATCH) -> Iterator[list[Record]]:
        """The current set (the newest record per uri), or with `history` every record of every
        chunk; UserError (one line) for a sink that cannot be reached or holds no record files."""
        self.check()
        names = list(self.chunk_names())
        if not names:
            raise UserError(f"RECORDS {self.url}: no record files under it")
        if history:
            return batched(self._all_records(names), batch_size)
        return batched(self._current_records(names), batch_size)

    def _all_records(self, names: list[str]) -> Iterator[Record]:
        for name in names:
            yield from self._decode(name)

    def _current_records(self, names: list[str]) -> Iterator[Record]:
        """Pass one: per record a 128-bit uri hash, its time and place (32 bytes, in numpy arrays);
        the newest place per hash wins. Pass two: read each chunk again and keep its winners."""
        hashes: list[np.ndarray] = []
        times: list[np.ndarray] = []
        places: list[np.ndarray] = []
        for index, name in enumerate(names):
            uris, stamps = self._chunk_keys(name)
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
            records = self._decode(name)
            for position in winners[start:stop] & 0xFFFFFFFF:
                yield records[int(position)]

    def _decode(self, name: str) -> list[Record]:
        try:
            return decode_records(self.chunk_bytes(name), format_of(name) or "jsonl")
        except (ValidationError, ValueError, pa.ArrowException) as exc:
            raise UserError(f"RECORDS {name}: not a record file ({_one_line(str(exc))[:200]})") from None

    def _chunk_keys(self, name: str) -> tuple[list[str], list[int]]:
        """A chunk's uris and processed_at (microseconds), in record order, without building records."""
        data = self.chunk_bytes(name)
        try:
            if format_of(name) == "parquet":
                table = pq.read_table(pa.BufferReader(data), columns=["uri", "processed_at"])
                stamps = table.column("processed_at").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
                return table.column("uri").to_pylist(), stamps.to_pylist()
            rows = [json.loads(line) for line in data.splitlines() if line.strip()]
            return [row["uri"] for row in rows], [_microseconds(row["processed_at"]) for row in rows]
        except (ValueError, KeyError, TypeError, pa.ArrowException) as exc:
            raise UserError(f"RECORDS {name}: not a record file ({_one_line(str(exc))[:200]})") from None


class ObjectStoreSink(ChunkReads, SinkContext):
    """Writes each chunk as one S3 object `{prefix}{chunk}.{format}` with a single PutObject."""

    def __init__(self, bucket: str, prefix: str = "", fmt: str = "jsonl", settings: Settings | None = None) -> None:
        check_format(fmt)
        self.bucket = bucket
        self.prefix = normalise_prefix(prefix)
        self.fmt = fmt
        self.url = f"s3://{bucket}/{self.prefix}"
        self._s3 = LazyS3Client(settings)

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None) -> "ObjectStoreSink":
        """`s3://bucket/prefix/[?format=jsonl|parquet]` -> a sink writing under that prefix."""
        base, fmt = split_format(url)
        try:
            location = parse_s3(base)
        except ValueError as exc:
            raise UserError(f"sink {url}: {exc}") from None
        sink = cls(location.bucket, location.key, fmt, settings)
        sink.url = url
        return sink

    @property
    def client(self) -> "S3Client":
        return self._s3.get()

    def key_for(self, chunk: str) -> str:
        """The object key of a chunk: `{prefix}{chunk}.{format}`."""
        return self.prefix + chunk_object_name(chunk, self.fmt)

    def write(self, records: Sequence[Record], chunk: str) -> None:
        """Put the whole chunk as one object; an empty chunk still writes one, marking it done."""
        key = self.key_for(chunk)
        body = encode_records(records, self.fmt)
        # errors propagate so the task retries; boto3 already retried throttling and 5xx
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=CONTENT_TYPES[self.fmt])

    def check(self) -> None:
        """The bucket exists and we may use it; UserError with the reason if not."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise UserError(f"sink s3://{self.bucket}/{self.prefix}: cannot use the bucket ({exc})") from None

    def close(self) -> None:
        """Each `write` is durable once PutObject returns: only the connections are closed."""
        self._s3.close()

    def keys(self, prefix_within: str = "") -> Iterator[str]:
        """Every chunk object's key under the sink's prefix (plus `prefix_within`), in key order."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix_within):
            for entry in page.get("Contents", []):
                # other tools' markers (e.g. `_SUCCESS`) are not chunks
                if format_of(entry["Key"]):
                    yield entry["Key"]

    def chunk_names(self, prefix_within: str = "") -> Iterator[str]:
        """The chunk objects' keys under the prefix (plus `prefix_within`), in key order (`ChunkReader`)."""
        return self.keys(prefix_within)

    def chunk_bytes(self, name: str) -> bytes:
        """One chunk object's body, named as `chunk_names` gives it."""
        body: bytes = self.client.get_object(Bucket=self.bucket, Key=name)["Body"].read()
        return body


class DirectorySink(ChunkReads, SinkContext):
    """Writes each chunk as one file `{directory}/{chunk}.{format}`, replaced atomically."""

    def __init__(self, directory: Path, fmt: str = "jsonl") -> None:
        check_format(fmt)
        # never create the root: a missing shared volume must fail, not fill the local disk
        if not directory.is_dir():
            raise UserError(f"sink directory {directory} does not exist (is the volume mounted?)")
        self.directory = directory
        self.fmt = fmt
        self.url = directory.absolute().as_uri() + "/"

    @classmethod
    def from_url(cls, url: str) -> "DirectorySink":
        """`file:///abs/dir/[?format=jsonl|parquet]` -> a sink writing files under that directory."""
        base, fmt = split_format(url)
        try:
            parts = urlsplit(base)
        except ValueError:  # `file://[`: a bracket opens an IPv6 host that never closes
            raise UserError(f"sink {url}: expected file:///absolute/directory/") from None
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise UserError(f"sink {url}: expected file:///absolute/directory/")
        sink = cls(Path(unquote(parts.path)), fmt)
        sink.url = url
        return sink

    def path_for(self, chunk: str) -> Path:
        """The file of a chunk: `{directory}/{chunk}.{format}`."""
        return self.directory / chunk_object_name(chunk, self.fmt)

    def write(self, records: Sequence[Record], chunk: str) -> None:
        """Write the chunk to a temporary file beside its target, then rename it into place."""
        target = self.path_for(chunk)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, encode_records(records, self.fmt))

    def check(self) -> None:
        """Checked when made: the directory exists."""

    def close(self) -> None:
        """Nothing to do: each `write` is fsynced before it returns."""

    def chunk_names(self, prefix_within: str = "") -> Iterator[str]:
        """The chunk files' names relative to the directory, starting with `prefix_within`, in name
        order (`ChunkReader`); half-written temporary files are not chunks."""
        for path in sorted(self.directory.rglob("*")):
            name = path.relative_to(self.directory).as_posix()
            if format_of(name) and path.is_file() and name.startswith(prefix_within):
                yield name

    def chunk_bytes(self, name: str) -> bytes:
        """One chunk file's content, named as `chunk_names` gives it."""
        return (self.directory / name).read_bytes()


def _write_atomically(target: Path, data: bytes) -> None:
    # same directory, so os.replace is a rename on one filesystem: readers see old or new, never half
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            # mkstemp makes 0600 files; other hosts on the shared volume need to read the results
            os.fchmod(handle.fileno(), 0o644)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def _fsync_directory(directory: Path) -> None:
    # the rename itself is only durable once the directory entry is flushed
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _microseconds(text: str) -> int:
    stamp = datetime.fromisoformat(text)
    # integer arithmetic: a float of seconds since 1970 cannot hold every microsecond exactly
    return (stamp.replace(tzinfo=stamp.tzinfo or UTC) - _EPOCH) // timedelta(microseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _uri_hashes(uris: list[str]) -> np.ndarray:
    # 128 bits: for ten million uris the chance that two collide is about 1e-25
    digests = b"".join(hashlib.blake2b(uri.encode(), digest_size=16).digest() for uri in uris)
    return np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2) if uris else np.zeros((0, 2), dtype=np.uint64)
