"""The Celery chunk task: a thin wrapper that validates the message and calls `run_chunk`.

Its retry and failure policy is `ChunkTask` (imagemill.worker.retries): transient faults are retried,
permanent ones (`classified`) fail the job at once; the worker process's signals are here.
"""

import logging
from typing import Any

from celery.exceptions import Reject
from celery.signals import task_rejected, task_unknown, worker_process_init, worker_process_shutdown
from pydantic import ValidationError

from imagemill.core.broker import CHUNK_TASK
from imagemill.core.schemas import ChunkMessage
from imagemill.worker.celery import app
from imagemill.worker.chunks import run_chunk
from imagemill.worker.retries import TRANSIENT, ChunkTask, classified
from imagemill.worker.runtime import runtime

log = logging.getLogger(__name__)


@app.task(name=CHUNK_TASK, base=ChunkTask, bind=True)
def annotate_chunk(self: ChunkTask, message: Any) -> dict[str, Any]:
    """Validate the message (a malformed one is rejected, never retried) and run the chunk."""
    try:
        chunk = ChunkMessage.model_validate(message)
    except ValidationError as exc:
        log.error("rejected a malformed chunk message (task id %s): %s", self.request.id, exc.errors()[:3])
        runtime().registry.count_rejected()
        raise Reject(f"malformed chunk message: {exc.error_count()} errors", requeue=False) from None
    try:
        result = run_chunk(chunk, runtime())
    except TRANSIENT as exc:
        # a deleted bucket, bad credentials or a full disk fail the job now instead of being retried
        fault = classified(exc)
        if fault is exc:
            raise
        raise fault from exc
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
