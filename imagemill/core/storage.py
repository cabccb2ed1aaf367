"""Object storage access: image URIs (`file://`, `s3://`) and reading one object's bytes.

Keys are opaque strings, never joined onto filesystem paths; failures become `ImageError`s.
"""

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from imagemill.core.errors import ErrorKind, ImageError
from imagemill.core.schemas import ImageRef
from imagemill.core.settings import Settings

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


def make_s3_client(settings: Settings) -> BaseClient:
    """One client per process: thread-safe to use, retries throttling and 5xx with backoff."""
    config = Config(
        # total attempts, first one included (botocore's `max_attempts` would count retries only)
        retries={"total_max_attempts": settings.s3_max_attempts, "mode": "standard"},
        max_pool_connections=settings.fetch_threads + 4,
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


class ObjectReader:
    """Reads image bytes from local files and S3, bounded by `max_image_bytes`."""

    def __init__(self, settings: Settings) -> None:
        self._max_bytes = settings.max_image_bytes
        self._settings = settings
        self._s3: BaseClient | None = None

    @property
    def s3(self) -> BaseClient:
        if self._s3 is None:
            self._s3 = make_s3_client(self._settings)
        return self._s3

    def read(self, ref: ImageRef) -> Blob:
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

    def _read_file(self, ref: ImageRef) -> Blob:
        path = local_path(ref.uri)
        try:
            with path.open("rb") as handle:
                stat = os.fstat(handle.fileno())
                if stat.st_size > self._max_bytes:
                    raise self._too_large(stat.st_size)
                return Blob(handle.read(self._max_bytes + 1), file_etag(stat))
        except FileNotFoundError:
            raise ImageError(ErrorKind.NOT_FOUND, f"no such file: {path}") from None
        except IsADirectoryError:
            raise ImageError(ErrorKind.NOT_AN_IMAGE, f"{path} is a directory") from None
        except PermissionError:
            raise ImageError(ErrorKind.FETCH_FAILED, f"permission denied reading {path}") from None
        except OSError as exc:
            raise ImageError(ErrorKind.FETCH_FAILED, f"cannot read {path}: {exc}") from None

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
        if len(data) > self._max_bytes:
            raise self._too_large(len(data))
        return Blob(data, response.get("ETag", "").strip('"') or ref.etag)


def _s3_error(uri: str, exc: ClientError) -> ImageError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    if code in NOT_FOUND_CODES:
        return ImageError(ErrorKind.NOT_FOUND, f"{uri} does not exist (deleted after listing?)")
    message = error.get("Message") or code or str(exc)
    return ImageError(ErrorKind.FETCH_FAILED, f"cannot fetch {uri}: {code} {message}".strip())
