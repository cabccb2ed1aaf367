"""Fetch, decode and preprocess on CPU threads ahead of the model, in listing order.

A bounded window of in-flight images keeps memory flat while the model never waits for I/O.
Items are references to fetch (`ImageRef`) or images already in memory (`InlineImage`).
"""

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
from PIL import Image

from imagemill.core.accounting import Accounting
from imagemill.core.errors import ErrorKind, ImageError
from imagemill.core.images import ObjectReader, is_s3
from imagemill.core.schemas import ImageQuality, ImageRef, RecordError, Timings
from imagemill.pipeline.prepare.decode import Decoded, ImageFacts, decode, from_image
from imagemill.pipeline.prepare.jpeg_header import PendingJpeg, read_header
from imagemill.pipeline.prepare.quality import image_quality

if TYPE_CHECKING:  # importing imagemill (the Python API) must not import torch
    import torch

MAX_URI_LENGTH = 4096  # ImageRef's bound: the uri ends up in a record like any other


@dataclass(frozen=True)
class InlineImage:
    """An image the caller already holds: encoded bytes, or a picture. Nothing to fetch.

    `uri` names it in its record (the Python API makes `bytes:sha256:<hex16>` or `pil:<index>`);
    `etag`, when given, is the content's version, as a fetched object's ETag is.
    """

    uri: str
    data: bytes | Image.Image
    etag: str | None = None

    def __post_init__(self) -> None:
        # checked here, in the caller's thread, not as a surprise on a prefetch thread
        if not 0 < len(self.uri) <= MAX_URI_LENGTH:
            raise ValueError(f"an inline image's uri must be 1 to {MAX_URI_LENGTH} characters, not {len(self.uri)}")
        if not isinstance(self.data, bytes | Image.Image):
            raise TypeError(f"an inline image holds bytes or a PIL image, not {type(self.data).__name__}")

    @property
    def ref(self) -> ImageRef:
        """How its record names it; `size` is the byte count of encoded data, unknown for a picture."""
        size = len(self.data) if isinstance(self.data, bytes) else None
        return ImageRef(uri=self.uri, etag=self.etag, size=size)


@dataclass
class Prepared:
    """One image after fetch and decode: either `decoded` (with `inputs`) or `error` is set.

    Or, when a device decodes JPEGs, `pending`: its bytes and header, for `imagemill.pipeline.prepare.staging`."""

    ref: ImageRef
    etag: str | None = None
    size: int | None = None
    decoded: ImageFacts | None = None  # a `Decoded` (with its picture) when Pillow decoded it
    quality: ImageQuality | None = None  # its statistics, when asked for
    # one per preprocessor, in order: host arrays, or rows of a batch on the models' device once staged
    inputs: "list[np.ndarray | torch.Tensor]" = field(default_factory=list)
    error: RecordError | None = None
    timings: Timings = field(default_factory=Timings)
    pending: PendingJpeg | None = None


class Prefetcher:
    """Fetches from S3 on `fetch_threads` and decodes on at most `decode_threads` at once; what needs no
    network (local files, images in memory) is read and decoded on `decode_threads` threads of its own."""

    Item: TypeAlias = ImageRef | InlineImage  # what `prepared` takes, and so what the engine takes

    def __init__(
        self,
        reader: ObjectReader,
        *,
        fetch_threads: int,
        decode_threads: int,
        max_pixels: int,
        min_side: int | None = None,
        preprocessors: Sequence[Callable[[Image.Image], np.ndarray]] = (),
        device_jpegs: bool = False,
        quality: bool = False,
        accounting: Accounting | None = None,
    ) -> None:
        """`min_side`: the shortest side the models need (decoding may reduce to it); `preprocessors`:
        one input recipe each, run on every decoded picture; `device_jpegs`: JPEGs a device can decode
        are left encoded (`Prepared.pending`) for it; `quality`: each picture's statistics measured;
        `accounting`: where the read, decode and preprocess seconds go (the engine's; the image
        statistics count as preprocessing, and JPEGs a device decodes are its staging's, not here)."""
        self._reader = reader
        self._pool = ThreadPoolExecutor(fetch_threads, thread_name_prefix="imagemill-fetch")
        # what needs no network (local files, images in memory) is read and decoded on as many threads as
        # may decode. Queued on the fetch threads instead, behind the decode slots, every image cost a
        # wake-up made holding the GIL (py-spy: up to a third of the GIL-held time of a local run on two
        # cores); without them a local run kept 1.3-1.5 cores busy instead of 1.0-1.35 (load average 3-4)
        self._local_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="imagemill-decode")
        # decode is CPU-bound: more threads than cores only adds contention
        self._decode_slots = threading.BoundedSemaphore(decode_threads)
        self._max_pixels = max_pixels
        self.min_side = min_side
        self.preprocessors = tuple(preprocessors)
        self.device_jpegs = device_jpegs
        self.quality = quality
        self.accounting = accounting if accounting is not None else Accounting(enabled=False)

    def prepared(self, refs: Iterable[Item], window: int) -> Iterator[Prepared]:
        """Yield every item's `Prepared`, in order, keeping up to `window` in flight."""
        in_flight: deque[Future[Prepared]] = deque()
        for source in refs:
            remote = isinstance(source, ImageRef) and is_s3(source.uri)
            in_flight.append((self._pool if remote else self._local_pool).submit(self._prepare, source))
            if len(in_flight) >= window:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()

    def _prepare(self, source: Item) -> Prepared:
        ref = source.ref if isinstance(source, InlineImage) else source
        item = Prepared(ref=ref, etag=ref.etag, size=ref.size)
        try:
            started = time.perf_counter()
            # an inline image skips the fetch: no byte limit either, its bytes are already in memory
            # (the pixel limit, checked before decoding, still guards against decompression bombs)
            content = source.data if isinstance(source, InlineImage) else self._fetch(item)
            fetched = time.perf_counter()
            item.timings.fetch_ms = (fetched - started) * 1000
            if self.accounting.enabled and not isinstance(source, InlineImage):
                self.accounting.add("read", fetched - started)
            device = self.device_jpegs and isinstance(content, bytes)
            header = read_header(content, self._max_pixels) if isinstance(content, bytes) and device else None
            if header is not None and isinstance(content, bytes):
                item.pending = PendingJpeg(content, header)
            else:
                self.decode_here(item, content)
            item.timings.decode_ms = (time.perf_counter() - fetched) * 1000
        except ImageError as exc:
            item.error = RecordError(kind=exc.kind, message=exc.message)
        return item

    def decode_here(self, item: Prepared, content: bytes | Image.Image) -> None:
        """Decode and preprocess on this thread (Pillow); ImageError for a bad image."""
        with self._decode_slots:
            # timed inside the slot: waiting for a free decode thread is not decoding
            started = time.perf_counter()
            # a picture skips decoding but not the rest: limits, orientation, RGB, reduction
            decoded = self._from_image(content) if isinstance(content, Image.Image) else self._decode(content)
            was_decoded = time.perf_counter()
            item.inputs = self._preprocess(decoded.image)
            item.decoded = decoded
            if self.quality:  # on the decode thread: the picture is at hand, the models are elsewhere
                item.quality = image_quality(decoded.image)
            if self.accounting.enabled:
                self.accounting.add("decode", was_decoded - started)
                self.accounting.add("preprocess", time.perf_counter() - was_decoded)

    def _fetch(self, item: Prepared) -> bytes:
        try:
            blob = self._reader.read(item.ref)
        except ImageError:
            raise
        except Exception as exc:  # a surprise from a client library still costs one image only
            raise ImageError(ErrorKind.FETCH_FAILED, f"{type(exc).__name__}: {exc}") from exc
        item.etag, item.size = blob.etag or item.ref.etag, len(blob.data)
        return blob.data

    def _decode(self, data: bytes) -> Decoded:
        try:
            return decode(data, max_pixels=self._max_pixels, min_side=self.min_side)
        except ImageError:
            raise
        except Exception as exc:  # malformed files make Pillow raise nearly anything
            message = f"the decoder failed on this file: {type(exc).__name__}: {exc}"
            raise ImageError(ErrorKind.UNSUPPORTED, message) from exc

    def _from_image(self, image: Image.Image) -> Decoded:
        try:
            return from_image(image, max_pixels=self._max_pixels, min_side=self.min_side)
        except ImageError:
            raise
        except Exception as exc:  # an odd mode or a damaged lazily opened file: this image only
            message = f"cannot convert this picture for the models: {type(exc).__name__}: {exc}"
            raise ImageError(ErrorKind.UNSUPPORTED, message) from exc

    def _preprocess(self, image: Image.Image) -> "list[np.ndarray | torch.Tensor]":
        try:
            return [prepare(image) for prepare in self.preprocessors]
        except Exception as exc:  # an input the resize cannot take costs this image only
            raise ImageError(ErrorKind.UNSUPPORTED, f"cannot prepare this image for the models: {exc}") from exc

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._local_pool.shutdown(wait=True, cancel_futures=True)
