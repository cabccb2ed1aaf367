"""The producer's Celery app for scheduled scans: Celery beat with a Redis-backed, locked scheduler
(RedBeat) that fires them, and the small worker that runs them (`imagemill beat`).

Building it reads no environment: `imagemill.producer.celery` makes the app the `celery` command finds.
"""

from celery import Celery

from imagemill.core.broker import make_celery
from imagemill.core.connections import redis_options
from imagemill.core.settings import Settings

SCAN_TASK = "imagemill.scan"
SCHEDULE_KEY_PREFIX = "imagemill:schedule:"


def make_producer_app(settings: Settings) -> Celery:
    """The broker's Celery app, plus beat's scheduler in the job registry's Redis and the scan route."""
    app = make_celery(settings)
    app.conf.update(
        include=["imagemill.producer.scans"],
        beat_scheduler="redbeat.RedBeatScheduler",
        redbeat_redis_url=settings.registry_url,
        # RedBeat builds its own client: with these it has every other client's timeouts and retries
        redbeat_redis_options=redis_options(),
        redbeat_key_prefix=SCHEDULE_KEY_PREFIX,
        # the lock makes a second beat wait instead of firing the same schedules again
        redbeat_lock_key=f"{SCHEDULE_KEY_PREFIX}lock",
        redbeat_lock_timeout=max(30, 5 * settings.beat_interval_s),
        beat_max_loop_interval=settings.beat_interval_s,
        task_routes={SCAN_TASK: {"queue": settings.schedule_queue}},
    )
    return app
