"""Cutting a stream of image references into chunk messages with stable ids (`job/000042`).

A chunk ends at `size` refs, or earlier where the stream says `CUT` (see `imagemill.producer.resume`).
"""

from collections.abc import Iterable, Iterator

from imagemill.core.schemas import ChunkMessage, ImageRef
from imagemill.core.tasks import Task


class Cut:
    """A mark in a stream of refs: the chunk being filled goes now, whatever its size."""

    def __repr__(self) -> str:
        return "CUT"


CUT = Cut()


def chunk_id(job_id: str, seq: int) -> str:
    return f"{job_id}/{seq:06d}"


def chunks(
    job_id: str, tasks: tuple[Task, ...], refs: Iterable[ImageRef | Cut], size: int, first_seq: int = 0
) -> Iterator[ChunkMessage]:
    """Chunks of at most `size` refs, numbered from `first_seq` in listing order; a `CUT` ends the
    chunk being filled early (where no ref waits, it is ignored: a chunk is never empty)."""
    seq = first_seq
    batch: list[ImageRef] = []
    for item in refs:
        if isinstance(item, Cut):
            if not batch:
                continue
        else:
            batch.append(item)
            if len(batch) < size:
                continue
        yield ChunkMessage(job_id=job_id, chunk_id=chunk_id(job_id, seq), tasks=tasks, refs=batch)
        seq, batch = seq + 1, []
    if batch:
        yield ChunkMessage(job_id=job_id, chunk_id=chunk_id(job_id, seq), tasks=tasks, refs=batch)
