"""The producer's Celery app: Celery beat with a Redis-backed, locked scheduler (RedBeat) that
fires scheduled scans, and the small worker that runs them (`imagemill beat`)."""

from imagemill.core.broker import make_celery
from imagemill.core.settings import Settings, get_settings

SCAN_TASK = "imagemill.scan"


def make_producer_app(settings: Settings):
    app = make_celery(settings)
    app.conf.update(
        include=["imagemill.producer.scans"],
        beat_scheduler="redbeat.RedBeatScheduler",
        redbeat_redis_url=settings.registry_url,
        redbeat_key_prefix="imagemill:schedule:",
        # the lock makes a second beat wait instead of firing the same schedules again
        redbeat_lock_key="imagemill:schedule:lock",
        redbeat_lock_timeout=max(30, 5 * settings.beat_interval_s),
        beat_max_loop_interval=settings.beat_interval_s,
        task_routes={SCAN_TASK: {"queue": settings.schedule_queue}},
    )
    return app


app = make_producer_app(get_settings())
