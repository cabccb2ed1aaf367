"""Object storage access: image URIs (`file://`, `s3://`), the S3 clients, and reading one object's bytes.

Keys are opaque strings, never joined onto filesystem paths; failures become `ImageError`s.
"""

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import unquote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from imagemill.core.errors import ErrorKind, ImageError
from imagemill.core.schemas import ImageRef
from imagemill.core.settings import Settings

if TYPE_CHECKING:
    # boto3-stubs (a dev dependency) types the client; at run time it is a botocore client
    from mypy_boto3_s3 import S3Client

NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str


@dataclass(frozen=True)
class Blob:
    """One fetched object: its bytes and the version they belong to."""

    data: bytes
    etag: str | None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def parse_s3(uri: str) -> S3Location:
    """`s3://bucket/some/key` -> bucket and key; the key is kept exactly as written."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri}")
    return S3Location(bucket, key)


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def file_uri(path: Path) -> str:
    return path.absolute().as_uri()


def local_path(uri: str) -> Path:
    """`file:///abs/path` (percent-encoded) or a bare path -> a local path."""
    if uri.startswith("file://"):
        return Path(unquote(urlsplit(uri).path))
    return Path(uri)


def file_etag(stat: os.stat_result) -> str:
    # a weak validator (mtime and size, like many web servers) so listing never reads contents
    return f"{stat.st_mtime_ns:x}-{stat.st_size:x}"


def local_ref(path: Path) -> ImageRef:
    """A reference to a local file; a dangling one still gets a ref (and later a not_found record)."""
    try:
        stat = path.stat()
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return ImageRef(uri=file_uri(path))
    return ImageRef(uri=file_uri(path), etag=file_etag(stat), size=stat.st_size)


def make_s3_client(settings: Settings) -> "S3Client":
    """One client per process: thread-safe to use, retries throttling and 5xx with backoff."""
    config = Config(
        # total attempts, first one included (botocore's `max_attempts` would count retries only)
        retries={"total_max_attempts": settings.s3_max_attempts, "mode": "standard"},
        max_pool_connections=settings.fetch_threads + 4,
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


# boto3's default session is not thread-safe while it makes a client: every client is made under this lock
_making = threading.Lock()


def _new_lock_in_child() -> None:
    # a fork while another thread held the lock would leave it held forever in the child
    global _making
    _making = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


class LazyS3Client:
    """The S3 client of a sink, reader or source: made on first use, in the process that uses it.

    Fork-safe: an object built (or even used) before a worker forks gives the child its own client,
    never a connection pool shared across processes. `settings` default to the environment's, read
    at first use."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._settings = settings
        self._client: S3Client | None = None
        self._pid = 0

    def get(self) -> "S3Client":
        pid = os.getpid()
        client = self._client
        if client is None or self._pid != pid:
            with _making:
                client = self._client
                if client is None or self._pid != pid:
                    # a parent's client is dropped, not closed: its sockets still serve the parent
                    client = make_s3_client(self._settings or Settings())
                    self._client, self._pid = client, pid
        return client

    def close(self) -> None:
        """Close this process's connections; the next `get` makes a new client."""
        client, self._client = self._client, None
        if client is not None and self._pid == os.getpid():
            client.close()


class ObjectReader:
    """Reads image bytes from local files and S3, bounded by `max_image_bytes`."""

    def __init__(self, settings: Settings) -> None:
        self._max_bytes = settings.max_image_bytes
        self._s3 = LazyS3Client(settings)

    @property
    def s3(self) -> "S3Client":
        return self._s3.get()

    def read(self, ref: ImageRef) -> Blob:
        if ref.problem is not None:  # a bad manifest line: nothing to fetch, its reason is the record's
            raise ImageError(ErrorKind.BAD_REFERENCE, ref.problem)
        if ref.size is not None and ref.size > self._max_bytes:
            raise self._too_large(ref.size)
        if is_s3(ref.uri):
            return self._read_s3(ref)
        return self._read_file(ref)

    def _too_large(self, size: int) -> ImageError:
        return ImageError(
            ErrorKind.TOO_LARGE,
            f"object is {size:,} bytes, over the limit of {self._max_bytes:,} (IMAGEMILL_MAX_IMAGE_BYTES)",
        )

    def _within_limit(self, data: bytes) -> bytes:
        """What was read, whose length alone is trusted: the reads ask for one byte past the limit."""
        if len(data) > self._max_bytes:
            raise self._too_large(len(data))
        return data

    def _read_file(self, ref: ImageRef) -> Blob:
        path = local_path(ref.uri)
        try:
            with path.open("rb") as handle:
                stat = os.fstat(handle.fileno())
                if stat.st_size > self._max_bytes:
                    raise self._too_large(stat.st_size)
                # one byte over the limit is enough to refuse it
                data = read_at_most(handle, stat.st_size, self._max_bytes + 1)
        except FileNotFoundError:
            raise ImageError(ErrorKind.NOT_FOUND, f"no such file: {path}") from None
        except IsADirectoryError:
            raise ImageError(ErrorKind.NOT_AN_IMAGE, f"{path} is a directory") from None
        except PermissionError:
            raise ImageError(ErrorKind.FETCH_FAILED, f"permission denied reading {path}") from None
        except OSError as exc:
            raise ImageError(ErrorKind.FETCH_FAILED, f"cannot read {path}: {exc}") from None
        return Blob(self._within_limit(data), file_etag(stat))

    def _read_s3(self, ref: ImageRef) -> Blob:
        loc = parse_s3(ref.uri)
        try:
            response = self.s3.get_object(Bucket=loc.bucket, Key=loc.key)
            length = response.get("ContentLength")
            if length is not None and length > self._max_bytes:
                response["Body"].close()
                raise self._too_large(length)
            data = response["Body"].read(self._max_bytes + 1)
        except ClientError as exc:
            raise _s3_error(ref.uri, exc) from None
        except BotoCoreError as exc:
            raise ImageError(ErrorKind.FETCH_FAILED, f"cannot fetch {ref.uri}: {exc}") from None
        return Blob(self._within_limit(data), response.get("ETag", "").strip('"') or ref.etag)


def read_at_most(handle: BinaryIO, size_hint: int, cap: int) -> bytes:
    """Up to `cap` bytes of `handle`, in one read where `size_hint` (its stat size) is right.

    A read asks the allocator for all it may return (asking for the cap costs ~150 us of CPU per image,
    more than the read), so it asks for the hint and one byte more. The size is only a hint: a pipe says 0
    and a growing file less than it yields, so where that byte more came the rest follows, up to the cap."""
    want = min(size_hint + 1, cap) if size_hint > 0 else cap
    data = handle.read(want)
    if len(data) == want < cap:
        data += handle.read(cap - want)
    return data


def _s3_error(uri: str, exc: ClientError) -> ImageError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    if code in NOT_FOUND_CODES:
        return ImageError(ErrorKind.NOT_FOUND, f"{uri} does not exist (deleted after listing?)")
    message = error.get("Message") or code or str(exc)
    return ImageError(ErrorKind.FETCH_FAILED, f"cannot fetch {uri}: {code} {message}".strip())
