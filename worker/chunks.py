"""One chunk of a distributed job: annotate it with the engine, write its records, count it.

Order matters for exactly-once records: write (idempotent) first, then count the chunk once.
"""

import logging
from collections import Counter
from dataclasses import dataclass

from imagemill.jobs import JobState
from imagemill.schemas import ChunkMessage, Record
from worker.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkResult:
    chunk_id: str
    outcome: str  # annotated | cancelled | unknown_job
    counts: dict[str, int]
    first_time: bool = True


def outcome_counts(records: list[Record]) -> Counter[str]:
    return Counter(record.error.kind.value if record.error else "annotated" for record in records)


def run_chunk(chunk: ChunkMessage, rt: Runtime) -> ChunkResult:
    """Annotate and store one chunk; a cancelled or unknown job's chunk is dropped."""
    job = rt.registry.get(chunk.job_id)
    if job is None:
        log.error("chunk %s belongs to no known job; dropped", chunk.chunk_id)
        return ChunkResult(chunk.chunk_id, "unknown_job", {})
    if job.state == JobState.CANCELLED:
        rt.registry.chunk_cancelled(chunk.job_id, chunk.chunk_id)
        return ChunkResult(chunk.chunk_id, "cancelled", {})
    engine = rt.engine(chunk.tasks)
    rt.registry.chunk_started(chunk.job_id, engine.signature)
    records = list(engine.annotate(chunk.refs, job_id=chunk.job_id))
    rt.sink(job.sink).write(records, chunk.chunk_id)
    counts = dict(outcome_counts(records))
    first = rt.registry.chunk_done(chunk.job_id, chunk.chunk_id, counts)
    if not first:
        log.info("chunk %s was redelivered; records rewritten, counters unchanged", chunk.chunk_id)
    return ChunkResult(chunk.chunk_id, "annotated", counts, first)
