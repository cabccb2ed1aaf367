"""One chunk of a distributed job: annotate it with the engine, write its records, count it.

Order matters for exactly-once records: write (idempotent) first, then count the chunk once.
A chunk whose deliveries keep killing their worker is dead-lettered: `worker_lost` records.
"""

import logging
import time
from collections import Counter
from dataclasses import dataclass

from imagemill.core.errors import ErrorKind
from imagemill.core.jobs import Job, JobState
from imagemill.core.logs import log_context
from imagemill.core.schemas import ChunkMessage, Record, RecordError
from imagemill.worker import metrics
from imagemill.worker.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkResult:
    chunk_id: str
    outcome: str  # annotated | dead_lettered | cancelled | unknown_job
    counts: dict[str, int]
    first_time: bool = True


def outcome_counts(records: list[Record]) -> Counter[str]:
    return Counter(record.outcome for record in records)


def run_chunk(chunk: ChunkMessage, rt: Runtime) -> ChunkResult:
    """Annotate and store one chunk; a cancelled or unknown job's chunk is dropped."""
    with log_context(job_id=chunk.job_id, chunk_id=chunk.chunk_id):
        return _run_chunk(chunk, rt)


def _run_chunk(chunk: ChunkMessage, rt: Runtime) -> ChunkResult:
    job = rt.registry.get(chunk.job_id)
    if job is None:
        log.error("chunk %s belongs to no known job; dropped", chunk.chunk_id)
        metrics.record_chunk_dropped("unknown_job")
        return ChunkResult(chunk.chunk_id, "unknown_job", {})
    if job.state == JobState.CANCELLED:
        if rt.registry.chunk_cancelled(chunk.job_id, chunk.chunk_id):
            metrics.record_chunk_dropped("cancelled")
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
    records = list(engine.annotate(chunk.refs, job_id=chunk.job_id))
    return _store(chunk, job, rt, records, "annotated")


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
    return _store(chunk, job, rt, records, "dead_lettered")


def _store(chunk: ChunkMessage, job: Job, rt: Runtime, records: list[Record], outcome: str) -> ChunkResult:
    started = time.perf_counter()
    rt.sink(job.sink).write(records, chunk.chunk_id)
    write_seconds = time.perf_counter() - started
    counts = dict(outcome_counts(records))
    first = rt.registry.chunk_done(chunk.job_id, chunk.chunk_id, counts, dead_lettered=outcome == "dead_lettered")
    if not first:
        log.info("chunk %s was redelivered; records rewritten, counters unchanged", chunk.chunk_id)
    result = ChunkResult(chunk.chunk_id, outcome, counts, first)
    metrics.record_chunk(result, records, write_seconds)
    return result
