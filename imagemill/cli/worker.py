"""`imagemill worker --gpus all|0,2|cpu`: one pinned Celery worker process per GPU, supervised.

Owns the command's options only; the supervisor (`imagemill.worker.supervisor`) runs the processes.
"""

import logging
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from imagemill.cli.display import fail, worker_extra_missing
from imagemill.core import logs
from imagemill.core.allowlists import SINKS_VARIABLE, SOURCES_VARIABLE
from imagemill.core.errors import UserError
from imagemill.core.gpus import plan_slots
from imagemill.worker.supervisor import Supervisor, check_alive, check_all_alive, own_status_file

log = logging.getLogger("imagemill.worker")


def worker(
    gpus: Annotated[str, typer.Option(help="all, cpu, or GPU indices such as 0,2.")] = "all",
    queues: Annotated[
        str | None, typer.Option(help="Comma-separated queues [default: IMAGEMILL_QUEUE and routed queues].")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Probe a running `imagemill worker` (liveness): exit 0 when its supervisor and Celery "
            "processes are alive, 1 with the reason when not; without IMAGEMILL_WORKER_STATUS_FILE, every "
            "worker running on this host. Starts nothing.",
        ),
    ] = False,
    ready: Annotated[
        bool,
        typer.Option("--ready", help="Like --check, and the broker answers a ping (readiness). Starts nothing."),
    ] = False,
) -> None:
    """Run annotation workers: one Celery worker process per GPU, restarted if it dies.

    Exits non-zero when a worker process keeps dying at start (IMAGEMILL_WORKER_MAX_CRASHES)."""
    # pydantic-settings, and the confinement's readers (boto3): when the command runs, not for `--help`
    from imagemill.core.settings import get_settings
    from imagemill.worker.confinement import REMOTE_SINKS, REMOTE_SOURCES

    settings = get_settings()
    if check or ready:
        probe(settings.worker_status_file, settings.broker_url if ready else None)
    if (hint := worker_extra_missing()) is not None:  # else each Celery child dies at import, restarted in vain
        fail(hint)
    logs.configure(settings.log_format, logging.INFO, "%(asctime)s %(levelname)s imagemill.worker: %(message)s")
    for variable, value in ((SOURCES_VARIABLE, settings.allowed_sources), (SINKS_VARIABLE, settings.allowed_sinks)):
        if value is None:
            admitted = REMOTE_SOURCES if variable == SOURCES_VARIABLE else REMOTE_SINKS
            log.warning("%s is unset: a chunk may name %s, and no local path", variable, admitted)
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
            json_lines=settings.log_format == "json",
            max_crashes=settings.worker_max_crashes,
            status_file=settings.worker_status_file or own_status_file(),
        ).run()
    )


def probe(status_file: Path | None, broker_url: str | None) -> NoReturn:
    """The probes' command: one line and exit 0 when healthy, 1 when not. Without a status file
    named, every worker running on this host (each writes its own)."""
    problem = check_all_alive() if status_file is None else check_alive(status_file)
    if problem is None and broker_url is not None:
        from imagemill.core.connections import check_reachable  # redis: only the readiness probe asks the broker

        try:
            check_reachable(broker_url)
        except UserError as exc:
            problem = str(exc)
    if problem is not None:
        typer.echo(f"unhealthy: {problem}", err=True)
        raise typer.Exit(1)
    typer.echo("ok")
    raise typer.Exit(0)
