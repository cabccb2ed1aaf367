"""Backpressure and fair share: a producer sends its next chunk only when its lane of the queue is
below the high-water mark and it is its job's turn among the lane's producers.

So a ten-million-object prefix never floods Redis memory (workers drain, the producer refills), a
full backfill lane never holds up an urgent submit (each lane has its own mark), and two jobs in
one lane take turns for the room the workers free (`JobRegistry.fair_turn`).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from imagemill.core.broker import lane_depth
from imagemill.core.connections import redis_client
from imagemill.core.lanes import DEFAULT_LANE, Lane
from imagemill.core.settings import Settings


@dataclass
class Backpressure:
    """Watches one lane of one queue through `client` (made by `imagemill.core.connections`);
    `turn` says whether the job may take the room now (always, when not given)."""

    client: redis.Redis
    queue: str
    high_water: int
    lane: Lane = DEFAULT_LANE
    turn: Callable[[], bool] = lambda: True
    poll_s: float = 0.25  # a shallow lane refills within a fraction of a chunk's time
    max_depth_seen: int = 0

    @classmethod
    def on_broker(cls, settings: Settings, queue: str, lane: Lane, turn: Callable[[], bool]) -> "Backpressure":
        """The lane's backpressure on the broker of `settings`, at its high-water mark (a submission's
        and a watcher's: each sends its chunks there)."""
        return cls(redis_client(settings.broker_url), queue, settings.queue_high_water, lane, turn=turn)

    def wait_for_room(self, keep_going: Callable[[], bool] = lambda: True) -> bool:
        """Block until the lane is below the mark and it is this job's turn; False if `keep_going`
        turned false meanwhile."""
        while True:
            depth = lane_depth(self.client, self.queue, self.lane)
            self.max_depth_seen = max(self.max_depth_seen, depth)
            if depth < self.high_water and self.turn():
                return True
            if not keep_going():
                return False
            time.sleep(self.poll_s)
