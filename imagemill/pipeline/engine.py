"""The annotation engine: image references in, one record per image out.

fetch ▸ decode on threads ahead of the models ▸ micro-batches through every task. The run loop
(`imagemill.pipeline.run`) drives it for local mode and the chunk task. Models load once per Engine.
"""

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from imagemill.core.accounting import MODEL_PREFIX, Accounting
from imagemill.core.batching import batched
from imagemill.core.errors import ErrorKind, ModelLoadError
from imagemill.core.images import ObjectReader
from imagemill.core.schemas import ImageInfo, Record, RecordError
from imagemill.core.settings import Settings
from imagemill.core.tasks import TASKS, Task
from imagemill.pipeline.hooks import Middleware
from imagemill.pipeline.models import load_runners
from imagemill.pipeline.models.device import one_thread
from imagemill.pipeline.models.runner import Runner, TaskOutput
from imagemill.pipeline.prepare.device_decode import DeviceDecoder, resolve_decode_device, supports
from imagemill.pipeline.prepare.prefetch import Prefetcher, Prepared
from imagemill.pipeline.prepare.preprocess import Preprocessor
from imagemill.pipeline.prepare.staging import Stager
from imagemill.pipeline.signature import QUALITY, QUALITY_OPTIONS, pipeline_signature

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What the models made of one prepared image."""

    outputs: dict[Task, TaskOutput]
    error: RecordError | None = None


class Engine:
    """Loads the models for `tasks` once; `annotate` turns refs into records, in order.

    `middleware` hears of every model load (when the engine loads its own runners) and batch;
    `accounting` holds the seconds each stage took, filled by the prefetcher, the engine and the run loop."""

    def __init__(
        self,
        settings: Settings,
        tasks: tuple[Task, ...],
        runners: list[Runner] | None = None,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.settings = settings
        self.tasks = tasks
        self.middleware = middleware
        self.runners: list[Runner] = runners if runners is not None else load_runners(settings, tasks, middleware)
        self.signature = pipeline_signature(self.runners, quality=settings.image_quality)
        # kept in every record beside the signature: with the outputs' models they give it again (retag)
        self.task_options = {runner.task.value: runner.options() for runner in self.runners}
        if settings.image_quality:
            self.task_options[QUALITY] = QUALITY_OPTIONS
        self._min_side = max(runner.min_side for runner in self.runners)
        # runners with the same input recipe share one preprocessed array per image
        self._recipes = list(dict.fromkeys(runner.preprocess for runner in self.runners))
        self._input_of = {id(runner): self._recipes.index(runner.preprocess) for runner in self.runners}
        self.accounting = Accounting(self.runners[0].device.type, enabled=settings.accounting)
        self.prefetcher = self._prefetcher(device_jpegs=False)
        self.stager: Stager | None = None
        try:
            decode_device = resolve_decode_device(settings.decode_device, self.runners[0].device)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from None
        if decode_device is not None or self.runners[0].device.type == "cuda":
            self.decode_on(decode_device)

    def decode_on(self, device: torch.device | None, decoder: DeviceDecoder | None = None) -> None:
        """Stage batches on the models' device one batch ahead; decode JPEGs on `device` (None: Pillow).

        Settings call it for a GPU; tests call it with the CPU, where the same code runs without streams.
        Recipes the device cannot compute (a processor imagemill does not mirror) keep the Pillow path."""
        recipes = self._recipes
        on_device = all(isinstance(recipe, Preprocessor) and supports(recipe) for recipe in recipes)
        if device is not None and not on_device:
            log.info("decoding on the CPU: a model's preprocessing is not one the device path computes")
        if device is not None and self.settings.image_quality:
            # the statistics are measured on the decoded picture, on the CPU: JPEGs are decoded there
            log.info("decoding on the CPU: IMAGEMILL_IMAGE_QUALITY measures the decoded pictures")
            on_device = False
        if device is not None and on_device:
            decoder = decoder or DeviceDecoder(
                device, [r for r in recipes if isinstance(r, Preprocessor)], self._min_side
            )
        else:
            decoder = None
        if self.prefetcher.device_jpegs != (decoder is not None):
            # whether JPEGs stay encoded for the device is the prefetcher's from its start: a new one
            self.prefetcher.close()
            self.prefetcher = self._prefetcher(device_jpegs=decoder is not None)
        if self.stager is not None:
            self.stager.close()
        runner = self.runners[0]
        self.stager = Stager(runner.device, runner.dtype, self.prefetcher.decode_here, decoder)

    def _prefetcher(self, *, device_jpegs: bool) -> Prefetcher:
        settings = self.settings
        return Prefetcher(
            ObjectReader(settings),
            fetch_threads=settings.fetch_threads,
            decode_threads=settings.decode_threads,
            max_pixels=settings.max_image_pixels,
            min_side=self._min_side,
            preprocessors=self._recipes,
            device_jpegs=device_jpegs,
            quality=settings.image_quality,
            accounting=self.accounting,
        )

    def annotate(self, refs: Iterable[Prefetcher.Item], job_id: str | None = None) -> Iterator[Record]:
        """One record per ref, in the refs' order; a bad image is an error record, never a raise."""
        size = self.settings.batch_size
        window = max(2 * size, 2 * self.settings.fetch_threads)
        batches: Iterable[list[Prepared]] = batched(self.prefetcher.prepared(refs, window), size)
        if self.stager is not None:
            batches = self.stager.staged(batches)
        accounting = self.accounting
        staged = iter(batches)
        got: float | None = None  # when the last batch arrived
        if accounting.enabled:
            accounting.mark_loop()
        while True:
            # the models wait here for input (fetch, decode, preprocess, staging): decode starvation
            waited = time.perf_counter() if accounting.enabled else 0.0
            if accounting.enabled and got is not None:
                # the last batch, from its arrival to here: its models (counted by `_infer`), the caller's
                # writes (counted by the caller) and the rest, the run thread's own work around them
                # (preparing the batch, building its records, handing them on, the GIL waits between):
                # the `records` stage, so that the stages add up to the run loop's wall time
                accounting.handed_on(waited - got)
            batch = next(staged, None)
            if accounting.enabled:
                got = time.perf_counter()
                accounting.starved(got - waited)
            if batch is None:
                return
            outcomes = self._infer([item for item in batch if item.decoded is not None])
            for item in batch:
                yield self._record(item, outcomes.get(id(item)), job_id)

    def close(self) -> None:
        self.prefetcher.close()
        if self.stager is not None:
            self.stager.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _infer(self, items: list[Prepared]) -> dict[int, Outcome]:
        outcomes = {id(item): Outcome(outputs={}) for item in items}
        if not items:
            return outcomes
        accounting = self.accounting
        started, cpu = time.perf_counter(), time.process_time() if accounting.enabled else 0.0
        # one batch tensor per input recipe, handed to each runner of that recipe: stacked and
        # copied once, and a model shared by two tasks (tags, embedding) sees the same tensor twice
        batches: dict[int, torch.Tensor] = {}
        before = started
        for runner in self.runners:
            self._run_task(runner, items, outcomes, batches)
            if accounting.enabled:
                # each runner's outputs reach the host (tolist, decoded text) before it returns: on a
                # GPU this is the synchronised time of its kernels, with no extra synchronisation
                after = time.perf_counter()
                accounting.add(MODEL_PREFIX + runner.task.value, after - before)
                before = after
        ended = time.perf_counter()
        if accounting.enabled:
            accounting.models(ended - started, time.process_time() - cpu)
        share_ms = (ended - started) * 1000 / len(items)
        for item in items:
            item.timings.infer_ms = share_ms
        for hook in self.middleware:
            hook.after_batch(len(items))
        return outcomes

    def _run_task(
        self, runner: Runner, items: list[Prepared], outcomes: dict[int, Outcome], batches: dict[int, torch.Tensor]
    ) -> None:
        with one_thread() if runner.one_thread_for(len(items)) else nullcontext():
            self._run_batch(runner, items, outcomes, batches)

    def _run_batch(
        self, runner: Runner, items: list[Prepared], outcomes: dict[int, Outcome], batches: dict[int, torch.Tensor]
    ) -> None:
        slot = self._input_of[id(runner)]
        try:
            if slot not in batches:
                batches[slot] = runner.batch([item.inputs[slot] for item in items])
            results = runner.infer(batches[slot])
            for item, result in zip(items, results, strict=True):
                outcomes[id(item)].outputs[runner.task] = result
        except Exception:  # noqa: BLE001 - whatever the model raised, the images alone say whose it was
            # the batch failed: run images alone so that one bad input costs only itself
            log.warning("%s batch of %d failed; retrying image by image", runner.task, len(items))
            for item in items:
                self._run_one(runner, item, outcomes[id(item)])

    def _run_one(self, runner: Runner, item: Prepared, outcome: Outcome) -> None:
        try:
            slot = self._input_of[id(runner)]
            outcome.outputs[runner.task] = runner.infer(runner.batch([item.inputs[slot]]))[0]
        except Exception as exc:
            log.exception("%s failed on %s", runner.task, item.ref.uri)
            outcome.error = RecordError(
                kind=ErrorKind.MODEL_FAILED, message=f"{runner.task} model failed: {type(exc).__name__}: {exc}"
            )

    def _record(self, item: Prepared, outcome: Outcome | None, job_id: str | None) -> Record:
        decoded = item.decoded
        outputs = outcome.outputs if outcome else {}
        # each task's output in the record field the task table names (validated there as its type)
        fields: dict[str, Any] = {TASKS[task].field: output for task, output in outputs.items()}
        return Record(
            uri=item.ref.uri,
            etag=item.etag,
            bytes=item.size,
            image=ImageInfo(width=decoded.width, height=decoded.height, format=decoded.format) if decoded else None,
            error=item.error or (outcome.error if outcome else None),
            signature=self.signature,
            job_id=job_id,
            timings=item.timings,
            task_options=self.task_options,
            quality=item.quality,
            **fields,
        )
