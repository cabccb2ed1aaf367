"""Thumbnails of stored records' images: read through the project's own object reader (files, S3),
decoded within the configured limits, at most 512 px on the longer side (2048 for the full-size
view), kept in an LRU cache.

Which URIs may be read is decided by the caller (the app serves only URIs the store holds a current
record of); this module also refuses any URI with a `..` path segment, whatever the store says.
"""

import io
import threading
from collections import OrderedDict
from urllib.parse import unquote, urlsplit

from PIL import Image

from imagemill.core.errors import ImageError
from imagemill.core.images import ObjectReader
from imagemill.core.schemas import ImageRef
from imagemill.core.settings import Settings
from imagemill.pipeline.prepare.decode import decode

MAX_SIDE = 512
FULL_SIDE = 2048  # the full-size view: enough to zoom into, never the original's 64 megapixels
QUALITY = 80


def safe_uri(uri: str) -> bool:
    """An s3:// or file:// URI without `..` segments (raw or percent-encoded), NUL or backslashes."""
    if not uri.startswith(("s3://", "file://")) or "\x00" in uri or "\\" in uri:
        return False
    path = uri[len("s3://") :] if uri.startswith("s3://") else unquote(urlsplit(uri).path)
    decoded = unquote(path)
    return not any(part == ".." for text in (path, decoded) for part in text.split("/"))


class Thumbnails:
    """JPEG thumbnails by (uri, etag), at most `max_side` px, computed once and kept (LRU, `capacity` entries)."""

    def __init__(self, settings: Settings, capacity: int = 512, max_side: int = MAX_SIDE) -> None:
        self._reader = ObjectReader(settings)
        self._max_pixels = settings.max_image_pixels
        self._capacity = capacity
        self._side = max_side
        self._cache: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, uri: str, etag: str) -> bytes:
        """The thumbnail's JPEG bytes; ImageError when the object cannot be read or decoded."""
        key = (uri, etag)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = self._make(uri, etag)
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return data

    def _make(self, uri: str, etag: str) -> bytes:
        blob = self._reader.read(ImageRef(uri=uri, etag=etag or None))
        # draft-decodes a JPEG at the smallest size that still gives max_side pixels on the shorter side
        picture = decode(blob.data, max_pixels=self._max_pixels, min_side=self._side).image
        picture.thumbnail((self._side, self._side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=QUALITY, optimize=True)
        return out.getvalue()


__all__ = ["FULL_SIDE", "MAX_SIDE", "ImageError", "Thumbnails", "safe_uri"]
