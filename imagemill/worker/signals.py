"""Celery signal handlers for observability: log format, job/chunk ids on log lines, metrics endpoint.

Imported by `worker/celery.py`, so they are connected before Celery sets up logging.
"""

import logging
from contextvars import ContextVar, Token
from typing import Any

from celery.signals import after_setup_logger, after_setup_task_logger, task_postrun, task_prerun, worker_process_init

from imagemill.core import logs
from imagemill.core.settings import get_settings
from imagemill.worker import metrics

log = logging.getLogger(__name__)

_task_tokens: dict[str, list[tuple[ContextVar[str | None], Token[str | None]]]] = {}

if get_settings().log_format == "json":
    logs.json_warnings()  # Celery warns (e.g. about running as root) before it sets up logging


@after_setup_logger.connect
@after_setup_task_logger.connect
def _format_logs(logger: logging.Logger | None = None, **_: Any) -> None:
    # IMAGEMILL_LOG_FORMAT=json: one JSON object per line; text: Celery's format, ids on the record
    if logger is not None:
        logs.apply(logger, get_settings().log_format)


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
