"""`imagemill worker --gpus all|0,2|cpu`: one pinned Celery worker process per GPU, supervised.

Owns the command's options only; the supervisor (`imagemill.worker.supervisor`) runs the processes.
"""

import logging
from typing import Annotated

import typer

from imagemill.cli.display import fail
from imagemill.core import logs
from imagemill.core.settings import get_settings
from imagemill.worker.supervisor import Supervisor, plan_slots


def worker(
    gpus: Annotated[str, typer.Option(help="all, cpu, or GPU indices such as 0,2.")] = "all",
    queues: Annotated[
        str | None, typer.Option(help="Comma-separated queues [default: IMAGEMILL_QUEUE and routed queues].")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run annotation workers: one Celery worker process per GPU, restarted if it dies.

    Exits non-zero when a worker process keeps dying at start (IMAGEMILL_WORKER_MAX_CRASHES)."""
    settings = get_settings()
    logs.configure(settings.log_format, logging.INFO, "%(asctime)s %(levelname)s imagemill.worker: %(message)s")
    try:
        slots = plan_slots(gpus)
    except ValueError as exc:
        fail(str(exc))
    chosen = (
        [q.strip() for q in queues.split(",") if q.strip()]
        if queues
        else sorted({settings.queue, *settings.routes.values()})
    )
    raise typer.Exit(
        Supervisor(
            slots=slots,
            queues=chosen,
            loglevel=loglevel,
            quiet=settings.log_format == "json",
            max_crashes=settings.worker_max_crashes,
        ).run()
    )
