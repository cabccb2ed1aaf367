"""The Celery app both services share: broker settings, JSON-only serialisation, routing by task,
and the lanes: each lane a priority step of kombu's Redis transport, one Redis list per queue and lane.

Producers send chunk messages with it; workers consume with it (`worker/celery.py`).
"""

import ssl
from typing import Any

import redis
from celery import Celery
from kombu import Queue

from imagemill.core.lanes import DEFAULT_LANE, KOMBU_PRIORITIES, Lane, lane_list, priority_list
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task

CHUNK_TASK = "imagemill.annotate_chunk"


def queue_for(tasks: tuple[Task, ...], settings: Settings) -> str:
    """The queue a job's chunks go to: the first of its tasks with a route, else the default."""
    for task in tasks:
        if task.value in settings.routes:
            return settings.routes[task.value]
    return settings.queue


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's configuration for `settings`: broker, serialisation, acknowledgement, queues and events."""
    queues = {settings.queue, *settings.routes.values()}
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a Redis restart is waited out, not fatal
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout,
            "socket_keepalive": True,
            "health_check_interval": 30,
            # the lanes: a worker's BRPOP names each priority step's lists of all its queues before the
            # next step's (kombu's `_brpop_start`), so an urgent chunk is taken before any normal one
            "priority_steps": list(KOMBU_PRIORITIES),
            # inside a step, the queues of several routes still take turns (the default, said here)
            "queue_order_strategy": "round_robin",
        },
        # a retried message keeps its priority (Celery copies it from the delivery); one sent without
        # any (a producer older than the lanes) is retried as normal rather than rounded to urgent
        "task_default_priority": DEFAULT_LANE.priority,
        # JSON only: any other serializer is refused before its payload is ever deserialised
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        # a chunk is acknowledged when done; a lost worker's chunk goes back to the queue
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue,
        "task_queues": [Queue(name) for name in sorted(queues)],
        "task_create_missing_queues": True,
        "worker_soft_shutdown_timeout": settings.soft_shutdown_timeout,
        "worker_enable_soft_shutdown_on_idle": False,  # an idle worker stops at once
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # events for Flower and celery-exporter: workers report task-received/started/succeeded/…,
        # producers task-sent
        "worker_send_task_events": True,
        "task_send_sent_event": True,
    }
    if settings.broker_url.startswith("rediss://") and "ssl_cert_reqs" not in settings.broker_url:
        config["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from `settings` (no tasks registered: each service adds its own)."""
    app = Celery("imagemill")
    app.conf.update(celery_config(settings))
    return app


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a Redis-backed Celery queue (all priority levels, so every lane)."""
    pipe = client.pipeline()
    for priority in KOMBU_PRIORITIES:
        pipe.llen(priority_list(queue, priority))
    return sum(pipe.execute())


def lane_depth(client: redis.Redis, queue: str, lane: Lane) -> int:
    """Chunks of `lane` waiting in `queue`."""
    return int(client.llen(lane_list(queue, lane)))
