"""Hooks around the pipeline: the points where cross-cutting code (metrics) observes the domain code.

The engine, the model loader and the worker's chunk runner call every `Middleware` they hold at
these points and know nothing of what it does; the base class does nothing, so a hook is opt-in.
"""

from collections.abc import Sequence
from typing import Protocol

from imagemill.core.schemas import Record, Task


class ChunkReport(Protocol):
    """What a chunk runner reports of a chunk it wrote (the worker's `ChunkResult` is one)."""

    @property
    def outcome(self) -> str:
        """annotated | dead_lettered"""

    @property
    def first_time(self) -> bool:
        """False when the job registry had already counted this chunk id (a redelivery)."""

    @property
    def write_seconds(self) -> float:
        """How long the one write of the chunk's records took."""


class Middleware:
    """Subclass and override the hooks you need; every hook runs on the thread of its caller."""

    def after_model_load(self, task: Task, seconds: float) -> None:
        """The model of `task` was loaded in `seconds`."""

    def after_batch(self, size: int) -> None:
        """A model batch of `size` decoded images ran through every task."""

    def after_chunk(self, result: ChunkReport, records: Sequence[Record]) -> None:
        """A chunk's `records` were written, then counted by the job registry (or found counted)."""

    def chunk_dropped(self, outcome: str) -> None:
        """A chunk was not run: `cancelled` (its job was) or `unknown_job`."""
