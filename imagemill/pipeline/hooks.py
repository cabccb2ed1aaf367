"""Hooks around the pipeline: the points where cross-cutting code (metrics) observes the domain code.

The engine, the model loader and the worker's chunk runner call every `Middleware` they hold at
these points and know nothing of what it does; the base class does nothing, so a hook is opt-in.
"""

from collections.abc import Sequence
from typing import Protocol

from imagemill.core.accounting import Figures
from imagemill.core.schemas import Record
from imagemill.core.tasks import Task


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

    @property
    def figures(self) -> Figures:
        """The accounting of this delivery: stage seconds, the models' time, their wait for input."""

    @property
    def cost(self) -> float | None:
        """What this delivery cost at IMAGEMILL_COST_PER_HOUR; None without a price."""

    @property
    def queue(self) -> str:
        """The queue its job was enqueued on (its tasks' route, or the default queue)."""

    @property
    def lane(self) -> str:
        """The lane of its job in that queue: urgent | normal | backfill."""

    @property
    def tasks(self) -> tuple[str, ...]:
        """The chunk's tasks."""


class Middleware:
    """Subclass and override the hooks you need; every hook runs on the thread of its caller."""

    def after_model_load(self, task: Task, seconds: float) -> None:
        """The model of `task` was loaded in `seconds`."""

    def after_batch(self, size: int) -> None:
        """A model batch of `size` decoded images ran through every task."""

    def after_chunk(self, result: ChunkReport, records: Sequence[Record]) -> None:
        """A chunk's `records` were written, then counted by the job registry (or found counted)."""

    def chunk_started(self, lane: str, queue_wait_s: float) -> None:
        """A worker started a chunk of `lane` that waited `queue_wait_s` since it was enqueued."""

    def uploads_recorded(self, lane: str, seconds: Sequence[float]) -> None:
        """Records were written for uploaded objects of `lane`, each `seconds` after its upload event."""

    def chunk_dropped(self, outcome: str) -> None:
        """A chunk was not run: `cancelled` (its job was cancelled or failed) or `unknown_job`."""
