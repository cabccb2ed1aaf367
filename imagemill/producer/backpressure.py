"""Backpressure: the producer waits while the queue holds more chunks than its high-water mark.

So a ten-million-object prefix never floods Redis memory; workers drain, the producer refills.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from imagemill.core.broker import queue_depth


@dataclass
class Backpressure:
    """Watches one queue's depth through `client` (made by `imagemill.core.connections`)."""

    client: redis.Redis
    queue: str
    high_water: int
    poll_s: float = 0.5
    max_depth_seen: int = 0

    def wait_for_room(self, keep_going: Callable[[], bool] = lambda: True) -> bool:
        """Block until the queue is below the mark; False if `keep_going` turned false meanwhile."""
        while True:
            depth = queue_depth(self.client, self.queue)
            self.max_depth_seen = max(self.max_depth_seen, depth)
            if depth < self.high_water:
                return True
            if not keep_going():
                return False
            time.sleep(self.poll_s)
