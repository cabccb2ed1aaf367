"""The Celery chunk task: a thin wrapper that validates the message and calls `run_chunk`.

Transient faults (database, storage, Redis) are retried by Celery with backoff and jitter.
"""

import logging
from typing import Any

import psycopg
import redis
from botocore.exceptions import BotoCoreError, ClientError
from celery import Task as CeleryTask
from celery.exceptions import Reject
from celery.signals import task_rejected, task_unknown, worker_process_init, worker_process_shutdown
from pydantic import ValidationError

from imagemill.core.broker import CHUNK_TASK
from imagemill.core.schemas import ChunkMessage
from imagemill.core.settings import get_settings
from imagemill.worker.celery import app
from imagemill.worker.chunks import run_chunk
from imagemill.worker.runtime import runtime

log = logging.getLogger(__name__)

TRANSIENT = (psycopg.OperationalError, redis.ConnectionError, redis.TimeoutError, BotoCoreError, ClientError, OSError)


class ChunkTask(CeleryTask):
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Retries are spent: fail the job loudly rather than leave it waiting for a lost chunk."""
        try:
            chunk = ChunkMessage.model_validate(args[0])
        except (ValidationError, IndexError):
            return
        reason = f"chunk {chunk.chunk_id} failed after {self.request.retries} retries: {type(exc).__name__}: {exc}"
        log.error("%s; job %s marked failed", reason, chunk.job_id)
        runtime().registry.fail(chunk.job_id, reason)


@app.task(
    name=CHUNK_TASK,
    base=ChunkTask,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT,
    # 2, 4, 8 … 120 s: about ten minutes of outage (a database failover, a Redis restart) is waited out
    retry_backoff=2,
    retry_backoff_max=120,
    retry_jitter=False,
    max_retries=get_settings().task_max_retries,
)
def annotate_chunk(self: CeleryTask, message: Any) -> dict[str, Any]:
    try:
        chunk = ChunkMessage.model_validate(message)
    except ValidationError as exc:
        log.error("rejected a malformed chunk message (task id %s): %s", self.request.id, exc.errors()[:3])
        runtime().registry.count_rejected()
        raise Reject(f"malformed chunk message: {exc.error_count()} errors", requeue=False) from None
    result = run_chunk(chunk, runtime())
    log.info("chunk %s: %s %s", result.chunk_id, result.outcome, result.counts)
    return {"chunk_id": result.chunk_id, "outcome": result.outcome, "counts": result.counts}


@worker_process_init.connect
def _load_models(**_: Any) -> None:
    # in the pool child, after the fork: CUDA starts here, and a bad model shows at start-up
    rt = runtime()
    try:
        rt.load(rt.settings.worker_tasks)
    except Exception:
        log.exception("could not load the models at start-up; chunks will report the error")


@worker_process_shutdown.connect
def _close_runtime(**_: Any) -> None:
    runtime().close()


@task_rejected.connect
@task_unknown.connect
def _count_refused(message: Any = None, exc: BaseException | None = None, **_: Any) -> None:
    # e.g. a payload in a foreign serializer (refused by accept_content unread) or an unknown task
    content_type = getattr(message, "content_type", "?")
    log.error("refused a message of type %s without running it: %s", content_type, exc)
    runtime().registry.count_rejected()
