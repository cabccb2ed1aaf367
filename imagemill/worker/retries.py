"""How the chunk task fails and retries, in one place: the transient faults, the backoff, the last resort.

Celery does the retrying (`autoretry_for`); `ChunkTask` carries the policy and fails the job when retries are spent.
"""

import logging
from typing import Any

import psycopg
import redis
from botocore.exceptions import BotoCoreError, ClientError
from celery import Task as CeleryTask
from pydantic import ValidationError

from imagemill.core.errors import UserError
from imagemill.core.schemas import ChunkMessage
from imagemill.core.settings import get_settings
from imagemill.worker.runtime import runtime

log = logging.getLogger(__name__)

# faults of the database, the object store or Redis that a later attempt may not meet
TRANSIENT: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    redis.ConnectionError,
    redis.TimeoutError,
    BotoCoreError,
    ClientError,
    OSError,
)
# faults a retry cannot mend (a model that cannot load, a sink the user must fix): the job fails at once
PERMANENT: tuple[type[Exception], ...] = (UserError,)


class ChunkTask(CeleryTask[[Any], dict[str, Any]]):
    """The chunk task's base: Celery's autoretry with this backoff, and a failed job once retries are spent."""

    autoretry_for = TRANSIENT
    dont_autoretry_for = PERMANENT
    throws = PERMANENT  # expected failures: Celery logs them in one line, without a traceback
    # 2, 4, 8 … 120 s: about ten minutes of outage (a database failover, a Redis restart) is waited out
    retry_backoff = 2
    retry_backoff_max = 120
    retry_jitter = False
    max_retries = get_settings().task_max_retries
    # a chunk is acknowledged once done, and handed back if its worker dies: records are never lost
    acks_late = True
    reject_on_worker_lost = True

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Retries are spent (or the fault is permanent): fail the job loudly rather than leave it
        waiting for a lost chunk."""
        try:
            chunk = ChunkMessage.model_validate(args[0])
        except (ValidationError, IndexError):
            return
        reason = f"chunk {chunk.chunk_id} failed after {self.request.retries} retries: {type(exc).__name__}: {exc}"
        log.error("%s; job %s marked failed", reason, chunk.job_id)
        runtime().registry.fail(chunk.job_id, reason)
