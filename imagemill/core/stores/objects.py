"""Chunk sinks: one S3 object, or one file on a shared volume, per chunk of records.

Each chunk's name is deterministic (`{prefix}{chunk}.{format}`), so a redelivered chunk replaces itself.

What they hold is append-only history per job: `{prefix}{job}/{seq}.{format}` has the records that
chunk wrote, and nothing is ever marked deleted or superseded (they are not `MarksDeleted` stores).
A replaced object's older records stay in older jobs' files; a deleted object's records stay
forever. The current set (per uri, the most recently processed record, less the uris a fresh
listing no longer has) is derived by reading them, the job of an export; the PostgreSQL store keeps
it as the view `imagemill_current`.
"""

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from botocore.exceptions import BotoCoreError, ClientError

from imagemill.core.errors import UserError
from imagemill.core.schemas import Record
from imagemill.core.settings import Settings
from imagemill.core.storage import LazyS3Client, parse_s3
from imagemill.core.stores.base import WriterContext
from imagemill.core.stores.files import decode_records, encode_records
from imagemill.core.stores.options import split_options

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


class ObjectStoreSink(WriterContext):
    """Writes each chunk as one S3 object `{prefix}{chunk}.{format}` with a single PutObject."""

    def __init__(self, bucket: str, prefix: str = "", fmt: str = "jsonl", settings: Settings | None = None) -> None:
        check_format(fmt)
        self.bucket = bucket
        self.prefix = normalise_prefix(prefix)
        self.fmt = fmt
        self._s3 = LazyS3Client(settings)

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None) -> "ObjectStoreSink":
        """`s3://bucket/prefix/[?format=jsonl|parquet]` -> a sink writing under that prefix."""
        base, fmt = split_format(url)
        try:
            location = parse_s3(base)
        except ValueError as exc:
            raise UserError(f"sink {url}: {exc}") from None
        return cls(location.bucket, location.key, fmt, settings)

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

    def read_all(self, prefix_within: str = "") -> list[Record]:
        """Every record in every chunk under the prefix, decoded by each object's own suffix."""
        records: list[Record] = []
        for key in self.keys(prefix_within):
            records.extend(decode_records(self.chunk_bytes(key), format_of(key) or self.fmt))
        return records

    def failed_records(self, job_id: str) -> list[Record]:
        """The job's records that carry an error (for `imagemill retry`)."""
        return [record for record in self.read_all(job_id + "/") if record.error]


class DirectorySink(WriterContext):
    """Writes each chunk as one file `{directory}/{chunk}.{format}`, replaced atomically."""

    def __init__(self, directory: Path, fmt: str = "jsonl") -> None:
        check_format(fmt)
        # never create the root: a missing shared volume must fail, not fill the local disk
        if not directory.is_dir():
            raise UserError(f"sink directory {directory} does not exist (is the volume mounted?)")
        self.directory = directory
        self.fmt = fmt

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
        return cls(Path(unquote(parts.path)), fmt)

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

    def read_all(self, prefix_within: str = "") -> list[Record]:
        """Every record in every chunk file whose relative name starts with `prefix_within`."""
        records: list[Record] = []
        for name in self.chunk_names(prefix_within):
            records.extend(decode_records(self.chunk_bytes(name), format_of(name) or self.fmt))
        return records

    def failed_records(self, job_id: str) -> list[Record]:
        """The job's records that carry an error (for `imagemill retry`)."""
        return [record for record in self.read_all(job_id + "/") if record.error]


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
