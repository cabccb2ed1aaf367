"""The one run loop every distributor calls: refs ▸ skip what the sink holds ▸ engine ▸ write ▸ count.

Local mode writes its file in batches and skips incrementally; the chunk task writes its chunk in one call.
"""

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from imagemill.core.accounting import Accounting
from imagemill.core.errors import ErrorKind
from imagemill.core.schemas import ImageRef, Record, RecordError
from imagemill.core.sinks import IncrementalSink, KeyedSink, SelectiveSink, Sink
from imagemill.pipeline.sources.incremental import skip_existing


class RecordEngine(Protocol):
    """What the loop needs of an engine (`imagemill.pipeline.engine.Engine` is one)."""

    @property
    def signature(self) -> str:
        """The pipeline signature every record carries; skipping matches records by it."""

    def annotate(self, refs: Iterable[ImageRef], job_id: str | None = None) -> Iterator[Record]:
        """One record per ref, in order."""


@dataclass(frozen=True)
class RunResult:
    """What one run did: images by outcome (`annotated`, `skipped` or an error kind), write time."""

    outcomes: Counter[str]
    write_seconds: float


def run(
    refs: Iterable[ImageRef],
    engine: RecordEngine,
    sink: Sink,
    *,
    chunk: str = "",
    write_every: int | None = None,
    skip: KeyedSink | None = None,
    on_skipped: Callable[[list[ImageRef]], None] | None = None,
    on_record: Callable[[Record], None] | None = None,
    job_id: str | None = None,
    accounting: Accounting | None = None,
) -> RunResult:
    """Annotate `refs` with `engine` and write every record to `sink` under `chunk`.

    `write_every=None` writes all records in one call, even none (one transaction or object per
    chunk); `write_every=n` writes every n records. Records are counted once written. With `skip`,
    refs that sink already holds an error-free record for are not annotated: their records are
    kept there (an `IncrementalSink` copies them into its new file; a database keeps its rows) and
    they count as `skipped`. `on_skipped` gets each batch of skipped refs and
    `on_record` each record as it leaves the engine (before its write). The sink is neither
    closed nor aborted here: its owner decides what an exception means for it. `accounting` (the
    engine's) gets the run's wall time, its writes and the images written."""
    if write_every is not None and write_every < 1:
        raise ValueError(f"write_every must be at least 1, not {write_every}")
    accounting = accounting or Accounting(enabled=False)
    with accounting.span():
        return _run(refs, engine, sink, chunk, write_every, skip, on_skipped, on_record, job_id, accounting)


def _run(
    refs: Iterable[ImageRef],
    engine: RecordEngine,
    sink: Sink,
    chunk: str,
    write_every: int | None,
    skip: KeyedSink | None,
    on_skipped: Callable[[list[ImageRef]], None] | None,
    on_record: Callable[[Record], None] | None,
    job_id: str | None,
    accounting: Accounting,
) -> RunResult:
    outcomes: Counter[str] = Counter()
    write_seconds = 0.0
    pending: list[Record] = []

    def flush() -> None:
        nonlocal pending, write_seconds
        pending = refuse_unwritable(sink, pending)
        seconds = timed_write(sink, pending, chunk)
        write_seconds += seconds
        if accounting.enabled:
            accounting.written(len(pending), seconds)
        outcomes.update(record.outcome for record in pending)
        pending = []  # a new list: the sink may hold on to the one it got

    if skip is not None:
        kept = skip

        def skipped(batch: list[ImageRef]) -> None:
            if isinstance(kept, IncrementalSink):
                kept.keep([(ref.uri, ref.etag, engine.signature) for ref in batch])
            outcomes["skipped"] += len(batch)
            if on_skipped is not None:
                on_skipped(batch)

        refs = skip_existing(refs, kept, engine.signature, skipped)
    for record in engine.annotate(refs, job_id=job_id):
        if on_record is not None:
            on_record(record)
        pending.append(record)
        if write_every is not None and len(pending) >= write_every:
            flush()
    if pending or write_every is None:
        flush()
    return RunResult(outcomes, write_seconds)


def refuse_unwritable(sink: Sink, records: list[Record]) -> list[Record]:
    """Records a selective sink cannot hold become `not_written` error records (still passed on:
    the sink ignores them), so they count as failed where the job shows its totals."""
    if not isinstance(sink, SelectiveSink):
        return records
    marked = []
    for record in records:
        reason = sink.refusal(record)
        if reason is not None and record.error is None:
            record = record.model_copy(update={"error": RecordError(kind=ErrorKind.NOT_WRITTEN, message=reason)})
        marked.append(record)
    return marked


def timed_write(sink: Sink, records: Sequence[Record], chunk: str = "") -> float:
    """Write `records` in one call; the seconds it took (the `write` stage of the metrics)."""
    started = time.perf_counter()
    sink.write(records, chunk)
    return time.perf_counter() - started
