"""`imagemill watch`: a long-lived service annotating objects as they are uploaded.

Arguments and the start-up lines only; the receivers and the job are `imagemill.producer.watch`'s.
"""

import logging
import signal
import threading
from typing import TYPE_CHECKING, Annotated

import typer

from imagemill.cli.annotate import ALL_TASKS, tasks_option
from imagemill.cli.display import console, fail, run_reporting_errors
from imagemill.cli.jobs import PRIORITY_HELP, SINK_HELP, lane_option, registry_for
from imagemill.core.errors import UserError
from imagemill.core.lanes import Lane
from imagemill.core.redaction import redact_url
from imagemill.core.tasks import Task

if TYPE_CHECKING:  # pydantic-settings, celery, boto3: loaded when the watch starts, not for `--help`
    from imagemill.core.settings import Settings
    from imagemill.producer.watch import Watch


SOURCE_HELP = (
    "sqs://QUEUE_NAME: S3 event notifications delivered to SQS; or http://HOST:PORT: listen there for an S3"
    " server's webhook (MinIO, Ceph RGW, SeaweedFS, Garage), secret in IMAGEMILL_WATCH_SECRET."
)


def watch(
    source: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    tasks: Annotated[str, typer.Option(help="Comma-separated: caption, moderation, tags.")] = ALL_TASKS,
    sink: Annotated[str | None, typer.Option(help=SINK_HELP)] = None,
    priority: Annotated[str, typer.Option(help=f"{PRIORITY_HELP} Uploads go to urgent unless set.")] = "urgent",
) -> None:
    """Annotate objects as they are created: one job that runs while the watch does (see `imagemill
    status`); removed objects leave the sink's current view. Stops on SIGINT or SIGTERM."""
    from imagemill.core import logs  # the service's log lines, text or JSON (IMAGEMILL_LOG_FORMAT)
    from imagemill.core.settings import get_settings  # pydantic-settings: when the command runs, not for `--help`

    chosen = tasks_option(tasks)
    lane = lane_option(priority)
    settings = run_reporting_errors(get_settings)
    logs.configure(settings.log_format, logging.INFO, "%(asctime)s %(levelname)s imagemill.watch: %(message)s")
    target = sink or settings.sink
    if not target:
        fail("no sink: pass --sink postgresql://… or s3://bucket/prefix/, or set IMAGEMILL_SINK")
    run_reporting_errors(lambda: _watch(source, chosen, target, lane, settings))


def _watch(source: str, tasks: tuple[Task, ...], sink: str, lane: Lane, settings: "Settings") -> None:
    # celery, boto3 and the sinks' drivers: loaded when the watch starts, not for `--help`
    from imagemill.producer.events.sqs import SCHEME as SQS_SCHEME
    from imagemill.producer.events.sqs import SqsReceiver, queue_name
    from imagemill.producer.submit import checked_sink
    from imagemill.producer.watch import Watch, follow_queue, serve_webhook

    if source.startswith(SQS_SCHEME):
        receiver = SqsReceiver(queue_name(source), settings.watch_visibility_timeout)
        checked_sink(sink)
        with registry_for(settings) as registry, Watch(source, tasks, sink, settings, registry, lane) as job:
            _announce(job)
            follow_queue(job, receiver, _stop_on_signals())
        return
    if source.startswith("http://"):
        try:
            # the webhook's module needs Starlette, which the watch extra installs
            from imagemill.producer.events.webhook import address
        except ModuleNotFoundError as exc:
            raise UserError(
                f"the HTTP receiver needs the watch extra (no module {exc.name!r}): pip install 'imagemill[watch]'"
            ) from None

        host, port = address(source)
        if settings.watch_secret is None:
            raise UserError(
                "the HTTP receiver needs a shared secret: set IMAGEMILL_WATCH_SECRET (16 characters or more)"
            )
        checked_sink(sink)
        with registry_for(settings) as registry, Watch(source, tasks, sink, settings, registry, lane) as job:
            _announce(job)
            # uvicorn stops on these and then raises them again for the handlers it found: ours, so the
            # watcher exits 0 like the SQS one instead of dying by the signal
            _stop_on_signals()
            serve_webhook(job, host, port, settings.watch_secret.get_secret_value())
        return
    raise UserError(f"source {source}: expected sqs://QUEUE_NAME or http://HOST:PORT")


def _announce(job: "Watch") -> None:
    """Register the job and print its id alone on a line (as `submit` does), then what is watched."""
    registered, created = job.register()
    typer.echo(registered.id)
    joined = "" if created else " (joined the running job)"
    where = f"{', '.join(registered.tasks)} → {redact_url(registered.sink)}"
    console.print(
        f"watching {job.source}: job [bold]{registered.id}[/]{joined}, lane {job.lane} ({where})", highlight=False
    )
    if not job.marks_removals:
        console.print("the sink keeps history only: removed objects are not marked", highlight=False)


def _stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM: the watcher finishes its batch and returns."""
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    return stop
