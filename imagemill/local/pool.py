"""Local mode on several GPUs: one engine process per GPU, no Redis, records back in listing order.

`imagemill annotate --gpus all|0,2|cpu:N` runs a `LocalPool` where it would run one `Engine`.
"""

import contextlib
import logging
import math
import multiprocessing
import multiprocessing.process
import os
import queue
import re
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnProcess
from typing import Any

from imagemill.core.accounting import Figures
from imagemill.core.batching import batched
from imagemill.core.errors import ErrorKind, ModelLoadError, UserError
from imagemill.core.gpus import CPU, Slot, detect_gpus, plan_slots
from imagemill.core.schemas import ImageRef, Record
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task

log = logging.getLogger(__name__)

_CPU_CHILDREN = re.compile(r"cpu:([0-9]+)")
POLL_S = 0.5  # how often the parent looks for dead children while it waits for records
REPORT_WAIT_S = 10  # how long the parent waits, after the last record, for each child's accounting
LOST_MESSAGE = "its engine process (CUDA_VISIBLE_DEVICES={gpus}) died while annotating this image's chunk"


class EngineProcessLost(UserError):
    """No engine process is left to annotate what remains (each one died); the run stops."""

    exit_code = 1


def plan_children(gpus: str, detect: Callable[[], list[str]] = detect_gpus) -> list[Slot] | None:
    """`--gpus`: None for `cpu` (this process, as before), else one slot per engine process.

    `all` or `0,2` are GPUs (nvidia-smi's indices; each must exist); `cpu:N` is N CPU children
    through the same path (tests, CPU machines). ValueError, one line, for anything else."""
    spec = gpus.strip().lower()
    if spec == CPU:
        return None
    if match := _CPU_CHILDREN.fullmatch(spec):
        count = int(match.group(1))
        if count < 1:
            raise ValueError(f"--gpus {gpus}: cpu:N needs at least one process")
        return [Slot(None, i) for i in range(count)]
    if spec.startswith(CPU):
        raise ValueError(f"--gpus {gpus}: expected all, cpu, cpu:N, or GPU indices such as 0,2")
    slots = plan_slots(spec, detect)
    if spec != "all":
        found = detect()
        unknown = [slot.gpu for slot in slots if slot.gpu not in found]
        if unknown:
            have = ", ".join(found) if found else "none"
            raise ValueError(f"--gpus {gpus}: no GPU {', '.join(map(str, unknown))} (found: {have})")
    return slots


def child_env(slot: Slot) -> dict[str, str]:
    """What a child sets in its environment before torch loads: the one GPU it sees, as cuda:0."""
    return slot.env({})


@dataclass
class _Child:
    """One engine process as the parent sees it: its inbox and the chunks it holds, oldest first."""

    slot: Slot
    process: SpawnProcess
    inbox: Any  # a spawn-context Queue: chunks in, None to stop
    results: Connection  # its own pipe back: a child killed mid-write cannot wedge the others' (a shared Queue's lock)
    held: deque[tuple[int, list[ImageRef]]] = field(default_factory=deque)
    finished: bool = False  # it annotated its last chunk and said so: its exit is not a death

    @property
    def held_refs(self) -> int:
        return sum(len(refs) for _, refs in self.held)


class LocalPool:
    """Spawns one engine process per slot; `annotate` deals chunks out and yields records in order.

    Each child is sent chunks until it holds `ahead` refs: more than its engine reads ahead of the
    records it yields (prefetch window, the batch being filled, the staged batch), so it never
    waits for refs while the parent waits for its records. Chunks are dealt no further than
    `window` past the oldest one not yet yielded: a stalled child holds back a bounded reorder
    buffer, not the rest of the listing's records. A child that dies costs the chunks it
    held (`worker_lost` records, like a dead-lettered chunk: the chunk that killed it would kill
    another); the others go on. When none is left the run stops (EngineProcessLost)."""

    def __init__(
        self, settings: Settings, tasks: tuple[Task, ...], slots: list[Slot], job_id: str | None = None
    ) -> None:
        size = settings.batch_size
        self.chunk_size = size  # one model batch per chunk: small enough to balance
        self.ahead = max(2 * size, 2 * settings.fetch_threads) + 3 * size + size
        # twice what the children hold at once: room for the fast ones to run on, never unbounded
        self.window = 2 * len(slots) * math.ceil(self.ahead / self.chunk_size)
        self.dealt = 0  # chunks dealt out so far
        self.delivered = 0  # chunks whose records were yielded: the oldest awaited one's index
        context = multiprocessing.get_context("spawn")
        self.children: list[_Child] = []
        self.visible: list[str] = []  # CUDA_VISIBLE_DEVICES as each child saw it, for logs and tests
        self.signature = ""
        self.job_id = job_id
        self._ended = False  # the children were told there is no more input (once: `annotate` runs once)
        self.figures = Figures()  # every child's accounting, summed as each says `done` (process seconds)
        try:
            for slot in slots:
                inbox = context.Queue()
                reader, writer = context.Pipe(duplex=False)
                process = context.Process(
                    target=_child_main,
                    args=(slot.index, child_env(slot), settings, tasks, job_id, inbox, writer),
                    name=f"imagemill-engine-{slot.name}",
                    daemon=True,
                )
                process.start()
                writer.close()  # the child holds the only writer: its death is EOF here
                self.children.append(_Child(slot, process, inbox, reader))
            self._wait_ready()
        except BaseException:
            self.close(graceful=False)
            raise

    def _wait_ready(self) -> None:
        """Every child has loaded its models: one signature for all, or the first child's failure."""
        signatures: dict[int, str] = {}
        visible: dict[int, str] = {}
        while len(signatures) < len(self.children):
            message = self._next_message()
            if message is None:
                self._check_alive(starting=True)
                continue
            kind, index, payload = message
            if kind == "ready":
                signatures[index], visible[index] = payload
            elif kind == "failed":
                raise ModelLoadError(payload)
        if len(set(signatures.values())) != 1:
            raise ModelLoadError(f"the engine processes loaded different pipelines: {sorted(set(signatures.values()))}")
        self.signature = signatures[0]
        self.visible = [visible[i] for i in range(len(self.children))]

    def annotate(self, refs: Iterable[ImageRef], job_id: str | None = None) -> Iterator[Record]:
        """One record per ref, in the refs' order, whichever child annotated it; once per pool (the
        children exit when the refs run out). `job_id` is the pool's, given when it started."""
        chunks = batched(refs, self.chunk_size)
        done: dict[int, list[Record]] = {}  # the reorder buffer: finished chunks by index
        checked = time.monotonic()
        listing_over = False
        while True:
            if not listing_over:
                listing_over = self._deal(chunks)
            while self.delivered in done:
                yield from done.pop(self.delivered)
                self.delivered += 1
            if listing_over and self.delivered == self.dealt:
                self._await_reports()
                return
            message = self._next_message()
            # looked for on every quiet poll and every POLL_S: busy siblings must not hide a death
            if message is None or time.monotonic() - checked > POLL_S:
                done.update(self._check_alive(starting=False, job_id=self.job_id))
                checked = time.monotonic()
            if message is not None:
                self._take(message, done)

    def _take(self, message: tuple[str, int, Any], done: dict[int, list[Record]]) -> None:
        """One child's message: a chunk's records into the reorder buffer, its `done` with its
        accounting, or its failure (which stops the run)."""
        kind, index, payload = message
        if kind == "records":
            chunk_index, records = payload
            held = self._child(index).held
            if held and held[0][0] == chunk_index:
                held.popleft()
            done[chunk_index] = records
        elif kind == "done":
            self._child(index).finished = True
            if payload:
                self.figures += Figures.from_fields(payload)
        elif kind == "failed":
            raise EngineProcessLost(f"engine process {index} failed: {payload}")

    def _await_reports(self) -> None:
        """Every record is out; each child's `done` (its accounting) follows its last chunk down the
        same pipe, so the summary waits for it rather than racing it: until each child said `done`
        or its pipe closed (it died after its last chunk: its figures are lost, its records not)."""
        leftover: dict[int, list[Record]] = {}
        deadline = time.monotonic() + REPORT_WAIT_S  # a child hung after its last chunk costs its figures only
        while any(not child.finished and not child.results.closed for child in self.children):
            if time.monotonic() > deadline:
                log.warning(
                    "an engine process sent no accounting within %d s; the summary leaves it out", REPORT_WAIT_S
                )
                return
            message = self._next_message()
            if message is not None:
                self._take(message, leftover)

    def _child(self, index: int) -> _Child:
        """The child of slot `index` (the list shrinks as children die: a position is not an index)."""
        return next(child for child in self.children if child.slot.index == index)

    def _deal(self, chunks: Iterator[list[ImageRef]]) -> bool:
        """Top every live child up to `ahead` refs, one chunk each in turn, within the reorder
        window; True once the listing is over."""
        while True:
            hungry = [child for child in self.children if child.held_refs < self.ahead]
            if not hungry:
                return False
            for child in hungry:
                if self.dealt - self.delivered >= self.window:
                    return False
                chunk = next(chunks, None)
                if chunk is None:
                    self._end_input()
                    return True
                child.held.append((self.dealt, chunk))
                child.inbox.put((self.dealt, chunk))
                self.dealt += 1

    def _next_message(self) -> tuple[str, int, Any] | None:
        readers = [child.results for child in self.children if not child.results.closed]
        if not readers:  # every child exited: nothing to wait on but liveness
            time.sleep(POLL_S)
        for reader in wait(readers, timeout=POLL_S) if readers else []:
            assert isinstance(reader, Connection)
            try:
                message: tuple[str, int, Any] = reader.recv()
            except (EOFError, OSError):  # it exited: liveness decides what that means
                reader.close()
                continue
            return message
        return None

    def _check_alive(self, *, starting: bool, job_id: str | None = None) -> dict[int, list[Record]]:
        """Drop dead children; their chunks as `worker_lost` records. Raises when none is left."""
        lost: dict[int, list[Record]] = {}
        for child in [c for c in self.children if not c.finished and not c.process.is_alive()]:
            code = child.process.exitcode
            if starting:
                raise ModelLoadError(f"engine process {child.slot.index} exited ({code}) while loading the models")
            log.error(
                "engine process %d exited (%s); its %d chunks are worker_lost", child.slot.index, code, len(child.held)
            )
            self.children.remove(child)
            message = LOST_MESSAGE.format(gpus=child_env(child.slot)["CUDA_VISIBLE_DEVICES"] or "''")
            for chunk_index, refs in child.held:
                lost[chunk_index] = [
                    Record.failed(ref, ErrorKind.WORKER_LOST, message, self.signature, job_id) for ref in refs
                ]
        if not self.children and not starting:
            raise EngineProcessLost("every engine process died; nothing is left to annotate the rest")
        return lost

    def _end_input(self) -> None:
        """No more chunks: each child annotates what it holds, reports it, says `done` and exits."""
        if self._ended:
            return
        self._ended = True
        for child in self.children:
            if child.process.is_alive():
                with contextlib.suppress(OSError, ValueError):
                    child.inbox.put(None)

    def close(self, *, graceful: bool = True) -> None:
        """Stop every child: the end of input and a short wait, then terminate; at once when not
        `graceful` (Ctrl-C, a failure: the run is over, what the children hold is not wanted)."""
        self._end_input()
        for child in self.children:
            if graceful:
                child.process.join(timeout=5)
            if child.process.is_alive():
                child.process.terminate()
                child.process.join(timeout=5)

    def __enter__(self) -> "LocalPool":
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(graceful=kind is None)


def _child_main(
    index: int,
    env: dict[str, str],
    settings: Settings,
    tasks: tuple[Task, ...],
    job_id: str | None,
    inbox: Any,
    results: Connection,
) -> None:
    """A spawned engine process: set its GPU before torch loads, load the models, annotate chunks."""
    os.environ.update(env)  # before the engine's import loads torch: CUDA reads it once, at init
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    try:
        # torch loads with the engine: only now, in the child, after its CUDA_VISIBLE_DEVICES is set
        from imagemill.pipeline.engine import Engine

        engine = Engine(settings.model_copy(update={"device": env["IMAGEMILL_DEVICE"]}), tasks)
    except Exception as exc:  # noqa: BLE001 - whatever stopped the load, the parent reports it in one line
        results.send(("failed", index, f"{type(exc).__name__}: {exc}"))
        return
    results.send(("ready", index, (engine.signature, os.environ.get("CUDA_VISIBLE_DEVICES", ""))))
    held: deque[tuple[int, int]] = deque()  # (chunk index, refs) in the order they were read

    def refs() -> Iterator[ImageRef]:
        parent = multiprocessing.process.parent_process()
        while True:
            try:
                message = inbox.get(timeout=POLL_S)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return  # an orphan: the parent was killed without stopping us
                continue
            if message is None:
                return
            chunk_index, chunk = message
            held.append((chunk_index, len(chunk)))
            yield from chunk

    accounting = engine.accounting
    try:
        # the child's own run: its wall time, and handing each chunk back is its `write`
        with engine, accounting.span():
            out: list[Record] = []
            for record in engine.annotate(refs(), job_id=job_id):
                out.append(record)
                while held and len(out) >= held[0][1]:
                    chunk_index, size = held.popleft()
                    sent = time.perf_counter()
                    results.send(("records", index, (chunk_index, out[:size])))
                    if accounting.enabled:
                        accounting.written(size, time.perf_counter() - sent)
                    out = out[size:]
        results.send(("done", index, accounting.figures().fields() if accounting.enabled else None))
    except Exception:  # noqa: BLE001 - a bug, not a bad image (those are records): the parent stops the run
        results.send(("failed", index, traceback.format_exc(limit=3).strip().splitlines()[-1]))
