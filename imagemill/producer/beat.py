"""The producer's Celery app for scheduled scans: Celery beat with a Redis-backed, locked scheduler
(RedBeat) that fires them, and the small worker that runs them (`imagemill beat`).

Building it reads no environment: `imagemill.producer.celery` makes the app the `celery` command finds.
"""

import logging
from typing import Any

from celery import Celery
from redbeat import RedBeatScheduler
from redis.exceptions import LockNotOwnedError

from imagemill.core.broker import make_celery
from imagemill.core.connections import redis_options
from imagemill.core.settings import Settings

SCAN_TASK = "imagemill.scan"
SCHEDULE_KEY_PREFIX = "imagemill:schedule:"

log = logging.getLogger(__name__)


class StandbyRedBeatScheduler(RedBeatScheduler):  # type: ignore[misc]  # redbeat ships no types
    """RedBeat, except that a beat whose lock lapsed (paused, stalled past the lock timeout) goes
    back to waiting for it, as a beat started second does.

    RedBeat renews the lock at every tick and, once another beat holds it, raises instead: the
    renewal checks the token, so the lapsed beat fires nothing, but its beat process dies while the
    `imagemill beat` worker around it runs on, and nothing would take over when the new holder
    stops."""

    def tick(self, *args: Any, **kwargs: Any) -> float:
        try:
            return float(super().tick(*args, **kwargs))
        except LockNotOwnedError:
            # raised by the renewal, before anything is due or sent: this tick fired nothing
            log.warning("beat: lost the lock %s to another beat; waiting for it again", self.lock_key)
        # blocks while the other holds it (polling every max_interval), like the first acquire
        self.lock.acquire()
        log.info("beat: acquired the lock %s again", self.lock_key)
        return 0.0  # tick at once: entries that fell due while waiting fire now


def make_producer_app(settings: Settings) -> Celery:
    """The broker's Celery app, plus beat's scheduler in the job registry's Redis and the scan route."""
    app = make_celery(settings)
    app.conf.update(
        include=["imagemill.producer.scans"],
        beat_scheduler=f"{__name__}:{StandbyRedBeatScheduler.__name__}",
        redbeat_redis_url=settings.registry_url,
        # RedBeat builds its own client: with these it has every other client's timeouts and retries
        redbeat_redis_options=redis_options(),
        redbeat_key_prefix=SCHEDULE_KEY_PREFIX,
        # the lock makes a second beat wait instead of firing the same schedules again
        redbeat_lock_key=f"{SCHEDULE_KEY_PREFIX}lock",
        # the holder renews it every tick (at most beat_interval_s apart): 5 ticks of slack
        redbeat_lock_timeout=max(settings.beat_lock_timeout_s, 5 * settings.beat_interval_s),
        beat_max_loop_interval=settings.beat_interval_s,
        task_routes={SCAN_TASK: {"queue": settings.schedule_queue}},
    )
    return app
