"""One chunk of a distributed job: annotate it through the run loop in one write, count it, report it.

Order matters for exactly-once records: write (idempotent) first, then count the chunk once.
A chunk whose deliveries keep killing their worker is dead-lettered: `worker_lost` records.
"""

import logging
from collections import Counter
from dataclasses import dataclass

from imagemill.core.errors import ErrorKind
from imagemill.core.jobs import Job, JobState
from imagemill.core.logs import log_context
from imagemill.core.schemas import ChunkMessage, Record, RecordError
from imagemill.pipeline.run import run, timed_write
from imagemill.worker.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkResult:
    """What became of one delivery of a chunk; the middleware's `after_chunk` gets it."""

    chunk_id: str
    outcome: str  # annotated | dead_lettered | cancelled | unknown_job
    counts: dict[str, int]
    first_time: bool = True
    write_seconds: float = 0.0


def run_chunk(chunk: ChunkMessage, rt: Runtime) -> ChunkResult:
    """Annotate and store one chunk; a cancelled or unknown job's chunk is dropped."""
    with log_context(job_id=chunk.job_id, chunk_id=chunk.chunk_id):
        return _run_chunk(chunk, rt)


def _run_chunk(chunk: ChunkMessage, rt: Runtime) -> ChunkResult:
    job = rt.registry.get(chunk.job_id)
    if job is None:
        log.error("chunk %s belongs to no known job; dropped", chunk.chunk_id)
        _dropped(rt, "unknown_job")
        return ChunkResult(chunk.chunk_id, "unknown_job", {})
    if job.state == JobState.CANCELLED:
        if rt.registry.chunk_cancelled(chunk.job_id, chunk.chunk_id):
            _dropped(rt, "cancelled")
        return ChunkResult(chunk.chunk_id, "cancelled", {})
    attempt = rt.registry.begin_attempt(chunk.job_id, chunk.chunk_id)
    try:
        deaths = attempt - 1
        if deaths and deaths >= rt.settings.max_worker_losses:
            return _dead_letter(chunk, job, rt, deaths)
        return _annotate(chunk, job, rt)
    finally:
        rt.registry.end_attempt(chunk.job_id, chunk.chunk_id)


def _annotate(chunk: ChunkMessage, job: Job, rt: Runtime) -> ChunkResult:
    engine = rt.engine(chunk.tasks)
    rt.registry.chunk_started(chunk.job_id, engine.signature)
    records: list[Record] = []
    # the whole chunk in one write: one transaction or one object per chunk, replaced on redelivery
    ran = run(
        chunk.refs, engine, rt.sink(job.sink), chunk=chunk.chunk_id, on_record=records.append, job_id=chunk.job_id
    )
    return _count(chunk, rt, records, ran.outcomes, "annotated", ran.write_seconds)


def _dead_letter(chunk: ChunkMessage, job: Job, rt: Runtime, deaths: int) -> ChunkResult:
    log.error("chunk %s killed its worker %d times; dead-lettered as worker_lost records", chunk.chunk_id, deaths)
    message = (
        f"the worker died {deaths} times while annotating this image's chunk; "
        "it was set aside (retry it with `imagemill retry`)"
    )
    signature = rt.engine(chunk.tasks).signature
    records = [
        Record(
            uri=ref.uri,
            etag=ref.etag,
            bytes=ref.size,
            signature=signature,
            job_id=chunk.job_id,
            error=RecordError(kind=ErrorKind.WORKER_LOST, message=message),
        )
        for ref in chunk.refs
    ]
    write_seconds = timed_write(rt.sink(job.sink), records, chunk.chunk_id)
    return _count(chunk, rt, records, Counter(record.outcome for record in records), "dead_lettered", write_seconds)


def _count(
    chunk: ChunkMessage,
    rt: Runtime,
    records: list[Record],
    outcomes: Counter[str],
    outcome: str,
    write_seconds: float,
) -> ChunkResult:
    """The records are written: count the chunk in the job registry (once per chunk id), then report it."""
    counts = dict(outcomes)
    first = rt.registry.chunk_done(chunk.job_id, chunk.chunk_id, counts, dead_lettered=outcome == "dead_lettered")
    if not first:
        log.info("chunk %s was redelivered; records rewritten, counters unchanged", chunk.chunk_id)
    result = ChunkResult(chunk.chunk_id, outcome, counts, first, write_seconds)
    for hook in rt.middleware:
        hook.after_chunk(result, records)
    return result


def _dropped(rt: Runtime, outcome: str) -> None:
    for hook in rt.middleware:
        hook.chunk_dropped(outcome)
