"""Where images come from: a local directory, an S3 prefix, or a manifest file (`pipeline.manifests`).

Each source yields `ImageRef`s lazily, so a prefix of ten million objects is never held in memory.
"""

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from botocore.exceptions import BotoCoreError, ClientError

from imagemill.core.errors import SourceError
from imagemill.core.images import LazyS3Client, file_uri, is_s3, parse_s3, s3_uri
from imagemill.core.images import local_ref as local_ref  # where the Python API has always imported it from
from imagemill.core.schemas import ImageRef
from imagemill.core.settings import Settings
from imagemill.pipeline.sources.manifests import ManifestSource, describe_formats, manifest_kind

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


def open_source(spec: str, settings: Settings) -> Source:
    """Turn the SOURCE argument into a source, or raise SourceError saying what is wrong."""
    if is_s3(spec):
        try:
            loc = parse_s3(spec)
        except ValueError as exc:
            raise SourceError(str(exc)) from None
        if manifest_kind(loc.key) is not None:  # a key named like a manifest is one; anything else a prefix
            return ManifestSource(spec, LazyS3Client(settings))
        return S3Source(loc.bucket, loc.key, LazyS3Client(settings))
    path = Path(spec).expanduser()
    if path.is_dir():
        return DirectorySource(path.absolute())
    if path.is_file() and manifest_kind(path.name) is not None:
        return ManifestSource(path.absolute())
    if path.is_file():
        raise SourceError(f"{spec} is a file but not a manifest (expected {describe_formats()})")
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
