"""Celery signal handlers for observability: log format, job/chunk ids on log lines, metrics endpoint.

Imported by `worker/celery.py`, so they are connected before Celery sets up logging.
"""

import logging
from contextvars import ContextVar, Token
from typing import Any

from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    task_postrun,
    task_prerun,
    task_received,
    worker_process_init,
)
from celery.utils.log import get_multiprocessing_logger
from celery.worker import state

from imagemill.core import logs
from imagemill.core.settings import get_settings
from imagemill.worker import metrics

log = logging.getLogger(__name__)

REQUEST_LOGGER = "celery.worker.request"  # Celery's lines about one request (its failure, WorkerLostError)
_task_tokens: dict[str, list[tuple[ContextVar[str | None], Token[str | None]]]] = {}

if get_settings().log_format == "json":
    logs.json_warnings()  # Celery warns (e.g. about running as root) before it sets up logging


@after_setup_logger.connect
@after_setup_task_logger.connect
def _format_logs(logger: logging.Logger | None = None, **_: Any) -> None:
    # IMAGEMILL_LOG_FORMAT=json: one JSON object per line; text: Celery's format, ids on the record.
    # Billiard's pool logger ("Process 'ForkPoolWorker-1' … exited with signal 9") has handlers of its own.
    for each in (logger, get_multiprocessing_logger()):
        if each is not None:
            logs.apply(each, get_settings().log_format)
            for handler in each.handlers:
                if not any(isinstance(f, RunningChunkFilter) for f in handler.filters):
                    handler.addFilter(RunningChunkFilter())


# the chunk the main process received last: a request's own log lines name it after it is released
_received: list[tuple[str, str] | None] = [None]


@task_received.connect
def _remember_chunk(request: Any = None, **_: Any) -> None:
    _received[0] = _chunk_ids(request)


class RunningChunkFilter(logging.Filter):
    """The ids of the chunk this worker runs, on lines its main process logs about it (a pool child
    that died, `WorkerLostError`), where no task context is set: with one chunk at a time, the one
    the main process holds, or for a request's own lines the one it received last, is the one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            try:
                held = {_chunk_ids(request) for request in (*state.active_requests, *state.reserved_requests)}
            except RuntimeError:  # the sets changed under another thread's log call: no ids this once
                return True
            held.discard(None)
            if not held and record.name == REQUEST_LOGGER and _received[0] is not None:
                held = {_received[0]}
            if len(held) == 1:
                record.job_id, record.chunk_id = held.pop() or (None, None)
        return True


def _chunk_ids(request: Any) -> tuple[str, str] | None:
    """(job id, chunk id) of a request for the chunk task, from its message as it came."""
    args = getattr(request, "args", None)
    message = args[0] if isinstance(args, list | tuple) and args else None
    if not isinstance(message, dict):
        return None
    job_id, chunk_id = message.get("job_id"), message.get("chunk_id")
    if isinstance(job_id, str) and isinstance(chunk_id, str):
        return job_id, chunk_id
    return None


@worker_process_init.connect
def _serve_metrics(**_: Any) -> None:
    # the pool child runs the chunks, so it owns the metrics (with --concurrency 1, one per GPU)
    try:
        metrics.serve(get_settings())
    except Exception:  # never stop a worker for its metrics
        log.exception("metrics: could not start the endpoint")


@task_prerun.connect
def _enter_log_context(task_id: str | None = None, args: Any = None, **_: Any) -> None:
    """Job and chunk ids on every line of the task, Celery's own `succeeded`/`failed` lines too.

    The message is not validated yet: only well-formed short strings are used."""
    message = args[0] if isinstance(args, list | tuple) and args else None
    if task_id is None or not isinstance(message, dict):
        return
    tokens = []
    for var, key in ((logs.JOB_ID, "job_id"), (logs.CHUNK_ID, "chunk_id")):
        value = message.get(key)
        if isinstance(value, str) and 0 < len(value) <= 80 and value.isprintable():
            tokens.append((var, var.set(value)))
    _task_tokens[task_id] = tokens


@task_postrun.connect
def _leave_log_context(task_id: str | None = None, **_: Any) -> None:
    for var, token in reversed(_task_tokens.pop(task_id or "", [])):
        try:
            var.reset(token)
        except ValueError:
            var.set(None)
