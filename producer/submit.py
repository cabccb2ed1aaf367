"""Submitting a job: register it, list the source, enqueue chunks under backpressure, finish.

Runs in the `imagemill submit` process; workers anywhere pick the chunks up from Redis.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from celery import Celery

from imagemill.broker import CHUNK_TASK, make_celery, queue_for
from imagemill.errors import UserError
from imagemill.jobs import Job, JobRegistry, JobState, new_job_id
from imagemill.schemas import ChunkMessage, Task
from imagemill.settings import Settings
from producer.backpressure import Backpressure
from producer.chunking import chunks
from producer.sources import Source

log = logging.getLogger(__name__)


@dataclass
class Submission:
    """One job being enqueued; `run` lists and enqueues everything, then closes the listing."""

    source: Source
    tasks: tuple[Task, ...]
    sink: str
    settings: Settings
    registry: JobRegistry
    job_id: str = field(default_factory=new_job_id)
    on_chunk: Callable[[ChunkMessage], None] = lambda chunk: None

    def __post_init__(self) -> None:
        self.queue = queue_for(self.tasks, self.settings)
        self.celery: Celery = make_celery(self.settings)
        broker = redis.Redis.from_url(self.settings.broker_url)
        self.backpressure = Backpressure(broker, self.queue, self.settings.queue_high_water)

    def register(self) -> Job:
        return self.registry.create(self.job_id, str(self.source), self.tasks, self.sink, self.queue)

    def run(self) -> int:
        """Enqueue every chunk; returns how many. Stops early if the job is cancelled."""
        count = 0
        try:
            for chunk in chunks(self.job_id, self.tasks, self.source.refs(), self.settings.chunk_size):
                if not self.backpressure.wait_for_room(self._still_running) or not self._still_running():
                    log.info("job %s is no longer running; stopped enqueueing", self.job_id)
                    break
                self._enqueue(chunk)
                count += 1
        except UserError as exc:
            self.registry.fail(self.job_id, str(exc))
            raise
        self.registry.end_listing(self.job_id, count)
        return count

    def _enqueue(self, chunk: ChunkMessage) -> None:
        self.celery.send_task(
            CHUNK_TASK, args=[chunk.model_dump(mode="json")], queue=self.queue, task_id=None
        )
        self.registry.add_queued(self.job_id, listed=len(chunk.refs), queued=len(chunk.refs))
        self.on_chunk(chunk)

    def _still_running(self) -> bool:
        return self.registry.state(self.job_id) == JobState.RUNNING
