"""Batches put onto the models' device one batch ahead: JPEGs decoded there, host arrays copied through pinned memory.

A thread stages batch k+1 (device decode, per-image Pillow fallback, copies on a side CUDA stream)
while the models run batch k. On a CPU the same code runs, without streams or pinning.
"""

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from imagemill.core.errors import ImageError
from imagemill.core.schemas import RecordError
from imagemill.pipeline.prepare.device_decode import DeviceBatch, DeviceDecoder
from imagemill.pipeline.prepare.prefetch import Prepared

log = logging.getLogger(__name__)


@dataclass
class Staged:
    """One batch whose decoded items' `inputs` are on the device, one tensor row per recipe slot."""

    items: list[Prepared]  # the whole batch, in order (errors included)
    tensors: list[torch.Tensor] = field(default_factory=list)  # what those rows are views of
    event: torch.cuda.Event | None = None  # recorded on the side stream once the tensors are complete


class Stager:
    """Stages batches on `device` in `dtype`, `depth` batches ahead of the caller.

    `fallback` decodes one item the Pillow way (on this thread) when the device decoder refuses it."""

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        fallback: Callable[[Prepared, bytes], None],
        decoder: DeviceDecoder | None = None,
        depth: int = 1,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.fallback = fallback
        self.decoder = decoder
        self.depth = depth
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="imagemill-stage")

    def staged(self, batches: Iterable[list[Prepared]]) -> Iterator[list[Prepared]]:
        """Every batch, staged, in order. The batches are drawn on the caller's thread."""
        ahead: deque[Future[Staged]] = deque()
        for batch in batches:
            ahead.append(self._pool.submit(self.stage, batch))
            if len(ahead) > self.depth:
                yield self._ready(ahead.popleft().result())
        while ahead:
            yield self._ready(ahead.popleft().result())

    def stage(self, batch: list[Prepared]) -> Staged:
        """Decode what waits for the device, then put every decoded item's inputs on it (side stream)."""
        stream = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        staged = Staged(items=batch)
        with stream:
            staged.tensors = self._decode_pending(batch)
            host = [item for item in batch if item.decoded is not None and isinstance(item.inputs[0], np.ndarray)]
            for slot in range(len(host[0].inputs) if host else 0):
                tensor = self._to_device(np.stack([item.inputs[slot] for item in host]))
                for row, item in enumerate(host):
                    item.inputs[slot] = tensor[row]
                staged.tensors.append(tensor)
            if self._stream is not None:
                staged.event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                staged.event.record(self._stream)
        return staged

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _ready(self, staged: Staged) -> list[Prepared]:
        if staged.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(staged.event)
            for tensor in staged.tensors:
                # made on the side stream, used on this one: the allocator must not reuse it early
                tensor.record_stream(current)
        return staged.items

    def _decode_pending(self, batch: list[Prepared]) -> list[torch.Tensor]:
        """Device-decode the batch's pending JPEGs; each one it refuses goes the Pillow way alone."""
        pending = [item for item in batch if item.pending is not None]
        jpegs = [item.pending for item in pending if item.pending is not None]
        for item in pending:
            item.pending = None  # its bytes are not kept once the batch is staged
        if not jpegs:
            return []
        if self.decoder is None:
            for item, jpeg in zip(pending, jpegs, strict=True):
                self._fall_back(item, jpeg.data)
            return []
        try:
            result = self.decoder.decode(jpegs)
        except Exception:  # out of device memory, a driver error: this batch goes the Pillow way
            log.exception("the device decode path failed on a batch of %d; Pillow decodes it", len(jpegs))
            result = DeviceBatch(decoded=[], inputs=[], rejected=list(range(len(jpegs))))
        for index in result.rejected:
            self._fall_back(pending[index], jpegs[index].data)
        tensors = [tensor.to(self.dtype) for tensor in result.inputs]
        for row, index in enumerate(result.decoded):
            item = pending[index]
            item.decoded = jpegs[index].header.decoded()
            item.inputs = [tensor[row] for tensor in tensors]
        return tensors

    def _fall_back(self, item: Prepared, data: bytes) -> None:
        try:
            self.fallback(item, data)
        except ImageError as exc:
            item.error = RecordError(kind=exc.kind, message=exc.message)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(array)
        if self._stream is not None:
            # pinned host memory makes the copy asynchronous, on the side stream, beside the models' work
            return pixels.pin_memory().to(self.device, dtype=self.dtype, non_blocking=True)
        return pixels.to(dtype=self.dtype)
