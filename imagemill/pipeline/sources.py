"""Where images come from: a local directory, an S3 prefix, or a manifest file.

Each source yields `ImageRef`s lazily, so a prefix of ten million objects is never held in memory.
"""

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from imagemill.core.errors import SourceError
from imagemill.core.schemas import ImageRef
from imagemill.core.settings import Settings
from imagemill.core.storage import LazyS3Client, file_etag, file_uri, is_s3, parse_s3, s3_uri

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

IMAGE_EXTENSIONS = frozenset(
    [
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".gif",
        ".webp",
        ".bmp",
        ".tif",
        ".tiff",
        ".avif",
        ".heic",
        ".heif",
        ".svg",
    ]
)
MANIFEST_SUFFIXES = frozenset({".jsonl", ".csv", ".txt"})


def is_image_name(name: str) -> bool:
    """Whether a file or key name has an image extension (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class Source(Protocol):
    """Anything that lists image references."""

    def __str__(self) -> str: ...

    def refs(self) -> Iterator[ImageRef]: ...


@runtime_checkable
class PrefixSource(Source, Protocol):
    """A source whose listing covers everything under one URI prefix: an image under it that a
    complete listing does not yield is gone. A manifest is not one (it names only some images)."""

    @property
    def uri_prefix(self) -> str: ...


@dataclass(frozen=True)
class DirectorySource:
    """Every file with an image extension under `root`, recursively, in a stable order."""

    root: Path

    def __str__(self) -> str:
        return str(self.root)

    @property
    def uri_prefix(self) -> str:
        """`file:///root/`: every listed uri starts with it (`file_uri` quotes each path the same way)."""
        root = file_uri(self.root)
        return root if root.endswith("/") else root + "/"

    def refs(self) -> Iterator[ImageRef]:
        seen: set[tuple[int, int]] = set()
        for folder, dirs, files in os.walk(self.root, followlinks=True):
            stat = os.stat(folder)
            if (stat.st_dev, stat.st_ino) in seen:  # a symlink loop back to a visited folder
                dirs[:] = []
                continue
            seen.add((stat.st_dev, stat.st_ino))
            dirs.sort()
            for name in sorted(files):
                if is_image_name(name):
                    yield local_ref(Path(folder) / name)


def local_ref(path: Path) -> ImageRef:
    """A reference to a local file; a dangling one still gets a ref (and later a not_found record)."""
    try:
        stat = path.stat()
    except OSError:
        return ImageRef(uri=file_uri(path))
    return ImageRef(uri=file_uri(path), etag=file_etag(stat), size=stat.st_size)


@dataclass
class S3Source:
    """Objects with image extensions under an `s3://bucket/prefix`, listed page by page.

    `client` is a ready client, or a `LazyS3Client` that makes one when the listing starts."""

    bucket: str
    prefix: str
    client: "S3Client | LazyS3Client" = field(repr=False)
    page_size: int = 1000

    def __str__(self) -> str:
        return s3_uri(self.bucket, self.prefix)

    @property
    def uri_prefix(self) -> str:
        """`s3://bucket/prefix`: S3 lists every key starting with the prefix, "folder" or not."""
        return s3_uri(self.bucket, self.prefix)

    def check(self) -> None:
        """SourceError in one line when the bucket does not exist or cannot be read."""
        client = self.client.get() if isinstance(self.client, LazyS3Client) else self.client
        try:
            client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                raise SourceError(f"source {self}: bucket {self.bucket} does not exist") from None
            raise SourceError(f"source {self}: cannot read bucket {self.bucket} ({code or exc})") from None
        except BotoCoreError as exc:
            raise SourceError(f"source {self}: cannot reach S3 ({exc})") from None

    def refs(self) -> Iterator[ImageRef]:
        client = self.client.get() if isinstance(self.client, LazyS3Client) else self.client
        paginator = client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(
                Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"PageSize": self.page_size}
            ):
                for obj in page.get("Contents", []):
                    key = obj["Key"]
                    if key.endswith("/") or not is_image_name(key):
                        continue
                    etag = obj.get("ETag", "").strip('"') or None
                    yield ImageRef(uri=s3_uri(self.bucket, key), etag=etag, size=obj.get("Size"))
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise SourceError(
                f"cannot list {self}: {error.get('Code', '')} {error.get('Message', '')}".strip()
            ) from None
        except BotoCoreError as exc:
            raise SourceError(f"cannot list {self}: {exc}") from None


@dataclass(frozen=True)
class ManifestSource:
    """A file naming images: `.jsonl` (a `uri` field), `.csv` (a `uri` column) or `.txt` (a line each).

    Entries may be s3:// URIs, file:// URIs or paths; relative paths are relative to the manifest.
    """

    path: Path

    def __str__(self) -> str:
        return str(self.path)

    def refs(self) -> Iterator[ImageRef]:
        readers = {".jsonl": self._jsonl, ".csv": self._csv, ".txt": self._txt}
        with self.path.open(encoding="utf-8", newline="") as handle:
            for line_no, entry in readers[self.path.suffix.lower()](handle):
                yield self._ref(line_no, entry)

    def _jsonl(self, handle: IO[str]) -> Iterator[tuple[int, dict[str, Any]]]:
        for line_no, line in enumerate(handle, 1):
            if line.strip():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{self.path}:{line_no}: not JSON ({exc.msg})") from None
                if not isinstance(entry, dict):
                    raise SourceError(f"{self.path}:{line_no}: expected an object with a uri")
                yield line_no, entry

    def _csv(self, handle: IO[str]) -> Iterator[tuple[int, dict[str, Any]]]:
        reader = csv.DictReader(handle)
        if "uri" not in (reader.fieldnames or []):
            raise SourceError(f"{self.path}: no 'uri' column (columns: {reader.fieldnames})")
        for row in reader:
            if row.get("uri"):
                yield reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}

    def _txt(self, handle: IO[str]) -> Iterator[tuple[int, dict[str, Any]]]:
        for line_no, line in enumerate(handle, 1):
            text = line.strip()
            if text and not text.startswith("#"):
                yield line_no, {"uri": text}

    def _ref(self, line_no: int, entry: dict[str, Any]) -> ImageRef:
        uri = entry.get("uri")
        if not isinstance(uri, str) or not uri:
            raise SourceError(f"{self.path}:{line_no}: entry has no uri")
        if not is_s3(uri) and not uri.startswith("file://"):
            return local_ref(self.path.parent / uri)
        try:
            return ImageRef(uri=uri, etag=entry.get("etag"), size=entry.get("size"))
        except ValidationError as exc:
            raise SourceError(f"{self.path}:{line_no}: bad entry: {exc.errors()[0]['msg']}") from None


def open_source(spec: str, settings: Settings) -> Source:
    """Turn the SOURCE argument into a source, or raise SourceError saying what is wrong."""
    if is_s3(spec):
        try:
            loc = parse_s3(spec)
        except ValueError as exc:
            raise SourceError(str(exc)) from None
        return S3Source(loc.bucket, loc.key, LazyS3Client(settings))
    path = Path(spec).expanduser()
    if path.is_dir():
        return DirectorySource(path.absolute())
    if path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        return ManifestSource(path.absolute())
    if path.is_file():
        raise SourceError(f"{spec} is a file but not a manifest (expected .jsonl, .csv or .txt)")
    raise SourceError(f"source {spec} does not exist (expected a folder, s3://bucket/prefix or a manifest)")


@dataclass(frozen=True)
class RefListSource:
    """A list of references already known (e.g. the failed images of a job being retried)."""

    name: str
    items: tuple[ImageRef, ...]

    def __str__(self) -> str:
        return self.name

    def refs(self) -> Iterator[ImageRef]:
        return iter(self.items)
