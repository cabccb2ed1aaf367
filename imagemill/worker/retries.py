"""How the chunk task fails and retries, in one place: the transient faults, the backoff, the last resort.

Celery does the retrying (`autoretry_for`); `ChunkTask` carries the policy and fails the job when retries are spent.
"""

import errno
import logging
import re
from typing import Any

import psycopg
import redis
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
from celery import Task as CeleryTask
from pydantic import ValidationError

from imagemill.core.errors import UserError
from imagemill.core.schemas import ChunkMessage
from imagemill.core.settings import get_settings
from imagemill.worker.runtime import runtime

log = logging.getLogger(__name__)

# The families a later attempt may mend: the database, the object store or Redis being unreachable,
# throttled or failing over. Inside them, `permanent_reason` picks out the faults no retry mends.
TRANSIENT: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    redis.ConnectionError,
    redis.TimeoutError,
    BotoCoreError,
    ClientError,
    OSError,
)

# S3 error codes that are answers, not outages: the bucket is gone, the keys are wrong or lack the
# permission. Other 4xx codes are permanent too unless listed in _S3_RETRYABLE.
_S3_PERMANENT = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "InvalidToken",
        "NoSuchBucket",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
    }
)
# 4xx codes S3 and its clones send for throttling and timeouts: retried like 5xx
_S3_RETRYABLE = frozenset(
    {
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ProvisionedThroughputExceededException",
    }
)
# a full disk or a file the worker may not write: an operator must act first
_OS_PERMANENT = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied"}
_OS_PERMANENT |= {errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system"}
# PostgreSQL SQLSTATE classes that no reconnection mends: 28 invalid authorization (bad user or
# password), 3D no such database, 42501 insufficient privilege
_PG_PERMANENT_STATES = ("28", "3D", "42501")
# the same faults met while connecting, where psycopg has no SQLSTATE: the server's FATAL message
_PG_PERMANENT_MESSAGES = re.compile(
    r"password authentication failed|role \S+ does not exist|database \S+ does not exist|no pg_hba\.conf entry"
)


class PermanentFault(Exception):
    """A fault of the environment no retry mends (a deleted bucket, bad credentials, a full disk);
    the chunk task fails its job at once, with this reason."""


def permanent_reason(exc: BaseException) -> str | None:
    """Why `exc` is permanent, in a few words; None when a later attempt may succeed (throttling,
    5xx, connection resets and timeouts, a database or Redis that is restarting)."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _S3_PERMANENT:
            return f"S3 {code}"
        if code in _S3_RETRYABLE or status >= 500 or status == 429:
            return None
        return f"S3 {code or status}" if 400 <= status < 500 else None
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return "no usable S3 credentials"
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate or ""
        if state.startswith(_PG_PERMANENT_STATES):
            return f"PostgreSQL SQLSTATE {state}"
        found = _PG_PERMANENT_MESSAGES.search(str(exc))
        return f"PostgreSQL: {found.group(0)}" if found else None
    if isinstance(exc, OSError) and exc.errno in _OS_PERMANENT:
        return _OS_PERMANENT[exc.errno]
    return None


def classified(exc: Exception) -> Exception:
    """`exc` as the chunk task raises it: a PermanentFault naming the reason, or as it was."""
    reason = permanent_reason(exc)
    if reason is None:
        return exc
    return PermanentFault(f"{reason}: {type(exc).__name__}: {exc}")


RETRY_BACKOFF_S = 2
RETRY_BACKOFF_MAX_S = 120


def backoff_s(retries: int) -> list[int]:
    """The upper bound of each pause before retry 1 … `retries` (Celery's exponential backoff)."""
    return [min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_S * 2**n) for n in range(retries)]


def expected_backoff_s(retries: int) -> float:
    """How long a chunk's retries wait in all, on average: each pause is uniform in [0, bound]."""
    return sum(bound / 2 for bound in backoff_s(retries))


# faults a retry cannot mend (a model that cannot load, a sink the user must fix): the job fails at once
PERMANENT: tuple[type[Exception], ...] = (UserError, PermanentFault)


class ChunkTask(CeleryTask[[Any], dict[str, Any]]):
    """The chunk task's base: Celery's autoretry with this backoff, and a failed job once retries are spent."""

    autoretry_for = TRANSIENT
    dont_autoretry_for = PERMANENT
    throws = PERMANENT  # expected failures: Celery logs them in one line, without a traceback
    # pauses drawn between 0 and 2, 4, 8 … 120 s ("full jitter", so workers that failed together do
    # not retry together); with the default 15 retries, about ten minutes of outage (a database
    # failover, a Redis restart) is waited out: see `expected_backoff_s`
    retry_backoff = RETRY_BACKOFF_S
    retry_backoff_max = RETRY_BACKOFF_MAX_S
    retry_jitter = True
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
        if isinstance(exc, PERMANENT):
            reason = f"chunk {chunk.chunk_id} failed, not retried: {exc}"
        else:
            reason = f"chunk {chunk.chunk_id} failed after {self.request.retries} retries: {type(exc).__name__}: {exc}"
        log.error("%s; job %s marked failed", reason, chunk.job_id)
        runtime().registry.fail(chunk.job_id, reason)
