"""One chunk of a distributed job: annotate it through the run loop in one write, count it, report it.

Order matters for exactly-once records: write (idempotent) first, then count the chunk once.
A chunk whose deliveries keep killing their worker is dead-lettered: `worker_lost` records.
A chunk of a job that ended (cancelled or failed) is dropped before any image is read.
"""

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from imagemill.core.accounting import Figures, cost
from imagemill.core.errors import ErrorKind
from imagemill.core.jobs import Job, JobState
from imagemill.core.lanes import DEFAULT_LANE
from imagemill.core.logs import log_context
from imagemill.core.rates import RateSample
from imagemill.core.schemas import ChunkMessage, Record
from imagemill.pipeline.run import run, timed_write
from imagemill.worker.confinement import check_chunk
from imagemill.worker.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkResult:
    """What became of one delivery of a chunk; the middleware's `after_chunk` gets it."""

    chunk_id: str
    outcome: str  # annotated | dead_lettered | cancelled (its job was cancelled or failed) | unknown_job
    counts: dict[str, int]
    first_time: bool = True
    write_seconds: float = 0.0
    figures: Figures = field(default_factory=Figures)  # what this delivery's run measured
    cost: float | None = None  # its wall time at IMAGEMILL_COST_PER_HOUR
    queue: str = ""
    tasks: tuple[str, ...] = ()
    lane: str = DEFAULT_LANE.value


def run_chunk(chunk: ChunkMessage, rt: Runtime) -> ChunkResult:
    """Annotate and write one chunk; a chunk of a cancelled, failed or unknown job is dropped unread."""
    with log_context(job_id=chunk.job_id, chunk_id=chunk.chunk_id):
        return _run_chunk(chunk, rt)


@dataclass(frozen=True)
class _Written:
    """A delivery's records, written: what counting and reporting it need."""

    records: list[Record]
    outcomes: Counter[str]
    outcome: str  # annotated | dead_lettered
    write_seconds: float
    figures: Figures
    rate: RateSample | None = None  # the rate sample of an annotated chunk, for `imagemill estimate`


def _run_chunk(chunk: ChunkMessage, rt: Runtime) -> ChunkResult:
    job = rt.registry.get(chunk.job_id)
    if job is None:
        log.error("chunk %s belongs to no known job; dropped", chunk.chunk_id)
        _dropped(rt, "unknown_job")
        return ChunkResult(chunk.chunk_id, "unknown_job", {})
    if job.state in (JobState.CANCELLED, JobState.FAILED, JobState.OVER_BUDGET):
        # nothing it would write can change the job's end: reading, decoding and running the models is
        # wasted (a failed job's sink may be gone; an over-budget job's money is spent). Counted as
        # cancelled either way: not run.
        if rt.registry.chunk_cancelled(chunk.job_id, chunk.chunk_id):
            _dropped(rt, "cancelled")
        return ChunkResult(chunk.chunk_id, "cancelled", {})
    check_chunk(chunk.refs, job.sink, rt.settings)  # outside the allow-lists: the job fails, nothing touched
    engine = rt.engine(chunk.tasks)
    waited = _queue_wait(chunk)
    # the registry hears of a chunk twice, in one round trip each (a one-image chunk's fixed cost):
    # here its attempt, its job's start and its queue wait; once written, its count, its latencies,
    # its rate sample and its attempt's end
    attempt = rt.registry.begin_chunk(chunk.job_id, chunk.chunk_id, engine.signature, chunk.lane, waited)
    try:
        if waited is not None:
            for hook in rt.middleware:
                hook.chunk_started(chunk.lane.value, waited)
        deaths = attempt - 1
        if deaths and deaths >= rt.settings.max_worker_losses:
            written = _dead_letter(chunk, job, rt, deaths)
        else:
            written = _annotate(chunk, job, rt)
        upload_seconds = _upload_seconds(chunk)
        first = rt.registry.end_chunk(
            chunk.job_id,
            chunk.chunk_id,
            written.outcomes,
            lane=chunk.lane,
            dead_lettered=written.outcome == "dead_lettered",
            figures=_flat(written.figures, rt),
            worker=rt.name,
            upload_to_record_s=upload_seconds,
            rate=written.rate,
        )
    except BaseException:
        # the attempt ended in this process (it raised): not a worker death
        rt.registry.end_attempt(chunk.job_id, chunk.chunk_id)
        raise
    return _report(chunk, rt, job, written, first, upload_seconds)


def _annotate(chunk: ChunkMessage, job: Job, rt: Runtime) -> _Written:
    engine = rt.engine(chunk.tasks)
    records: list[Record] = []
    before = engine.accounting.figures()
    # the whole chunk in one write: one transaction or one object per chunk, replaced on redelivery
    ran = run(
        chunk.refs,
        engine,
        rt.sink(job.sink),
        chunk=chunk.chunk_id,
        on_record=records.append,
        job_id=chunk.job_id,
        accounting=engine.accounting,
    )
    figures = engine.accounting.figures() - before
    rate = rt.rate_sample(chunk.tasks, engine.signature, figures, sum(record.bytes or 0 for record in records))
    return _Written(records, ran.outcomes, "annotated", ran.write_seconds, figures, rate)


def _dead_letter(chunk: ChunkMessage, job: Job, rt: Runtime, deaths: int) -> _Written:
    log.error("chunk %s killed its worker %d times; dead-lettered as worker_lost records", chunk.chunk_id, deaths)
    message = (
        f"the worker died {deaths} times while annotating this image's chunk; "
        "it was set aside (retry it with `imagemill retry`)"
    )
    signature = rt.engine(chunk.tasks).signature
    records = [Record.failed(ref, ErrorKind.WORKER_LOST, message, signature, chunk.job_id) for ref in chunk.refs]
    started = time.perf_counter()
    write_seconds = timed_write(rt.sink(job.sink), records, chunk.chunk_id)
    # no model ran: the chunk's figures are its write, which is what its worker spent on it
    figures = Figures(images=len(records), wall_s=time.perf_counter() - started, stages={"write": write_seconds})
    outcomes = Counter(record.outcome for record in records)
    return _Written(records, outcomes, "dead_lettered", write_seconds, figures)


def _flat(figures: Figures, rt: Runtime) -> dict[str, float]:
    """The chunk's figures and its cost as the job registry adds them up."""
    spent = cost(figures.wall_s, rt.settings.cost_per_hour)
    return figures.fields() | ({"cost": spent} if spent is not None else {})


def _report(
    chunk: ChunkMessage, rt: Runtime, job: Job, written: _Written, first: bool, upload_seconds: list[float]
) -> ChunkResult:
    """The records are written and the chunk counted (once per chunk id, with its figures and cost):
    tell the middleware."""
    if not first:
        log.info("chunk %s was redelivered; records rewritten, counters unchanged", chunk.chunk_id)
    elif upload_seconds:
        for hook in rt.middleware:
            hook.uploads_recorded(chunk.lane.value, upload_seconds)
    result = ChunkResult(
        chunk.chunk_id,
        written.outcome,
        dict(written.outcomes),
        first,
        written.write_seconds,
        written.figures,
        cost(written.figures.wall_s, rt.settings.cost_per_hour),
        job.queue,
        tuple(chunk.tasks),
        chunk.lane.value,
    )
    for hook in rt.middleware:
        hook.after_chunk(result, written.records)
    return result


def _queue_wait(chunk: ChunkMessage) -> float | None:
    """The time from the chunk's enqueueing to this start (each delivery's, from the first send: a
    retried or handed-back chunk waited all of it), for the metrics and for `status`; None from a
    producer older than the lanes."""
    if chunk.enqueued_at is None:
        return None
    return max(time.time() - chunk.enqueued_at, 0.0)


def _upload_seconds(chunk: ChunkMessage) -> list[float]:
    """Upload-to-record of the refs an upload event announced: their records are written, and are
    counted in the same step that keeps these."""
    now = time.time()
    return [max(now - ref.event_time, 0.0) for ref in chunk.refs if ref.event_time is not None]


def _dropped(rt: Runtime, outcome: str) -> None:
    for hook in rt.middleware:
        hook.chunk_dropped(outcome)
