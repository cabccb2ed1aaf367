"""Cutting a stream of image references into chunk messages with stable ids (`job/000042`)."""

from collections.abc import Iterable, Iterator
from itertools import islice

from imagemill.core.schemas import ChunkMessage, ImageRef, Task


def chunk_id(job_id: str, seq: int) -> str:
    return f"{job_id}/{seq:06d}"


def chunks(
    job_id: str, tasks: tuple[Task, ...], refs: Iterable[ImageRef], size: int, first_seq: int = 0
) -> Iterator[ChunkMessage]:
    """Chunks of at most `size` refs, numbered from `first_seq` in listing order."""
    iterator = iter(refs)
    seq = first_seq
    while batch := list(islice(iterator, size)):
        yield ChunkMessage(job_id=job_id, chunk_id=chunk_id(job_id, seq), tasks=tasks, refs=batch)
        seq += 1
