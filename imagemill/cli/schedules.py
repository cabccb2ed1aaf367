"""`imagemill schedule add|list|remove` and `imagemill beat`: scheduled incremental scans.

Schedules live in Redis (RedBeat); `imagemill beat` fires them, and a lock keeps it to one.
"""

import os
import re
import sys
from datetime import timedelta
from typing import Annotated

import typer
from celery import Celery
from celery.schedules import schedule
from redbeat import RedBeatSchedulerEntry
from redbeat.schedulers import ensure_conf, get_redis
from rich.table import Table

from imagemill.cli.annotate import ALL_TASKS, tasks_option
from imagemill.cli.display import console, fail, run_reporting_errors, stdout
from imagemill.cli.jobs import SINK_HELP
from imagemill.core.connections import check_reachable
from imagemill.core.credentials import without_credentials
from imagemill.core.redaction import redact_url
from imagemill.core.settings import Settings, get_settings
from imagemill.producer.beat import SCAN_TASK, make_producer_app
from imagemill.producer.submit import check_source_fits_sink

app = typer.Typer(help="Scheduled scans: incremental submits fired by `imagemill beat`.", no_args_is_help=True)

_DURATION = re.compile(r"(\d+)([dhms])")
_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def parse_every(text: str) -> timedelta:
    """`1h`, `30m`, `1h30m`, `45s`, `1d` -> a timedelta; ValueError otherwise."""
    parts = _DURATION.findall(text.strip().lower())
    if not parts or "".join(n + u for n, u in parts) != text.strip().lower():
        raise ValueError(f"--every {text}: expected a duration such as 30s, 15m, 1h or 1d")
    every = timedelta(**{_UNITS[unit]: int(n) for n, unit in parts})
    if every.total_seconds() < 1:
        raise ValueError("--every must be at least 1s")
    return every


def _beat_app() -> Celery:
    """The producer's Celery app, its schedules' Redis checked reachable (one line, exit 2, if not)."""
    settings = get_settings()
    run_reporting_errors(lambda: check_reachable(settings.registry_url))
    celery = make_producer_app(settings)
    ensure_conf(celery)
    return celery


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="A name for the schedule.")],
    source: Annotated[str, typer.Argument(help="A folder, s3://bucket/prefix, or a manifest.")],
    every: Annotated[str, typer.Option(help="How often: 30s, 15m, 1h, 1d.")] = "1h",
    tasks: Annotated[str, typer.Option(help="Comma-separated: caption, moderation, tags.")] = ALL_TASKS,
    sink: Annotated[str | None, typer.Option(help=SINK_HELP)] = None,
) -> None:
    """Scan SOURCE every so often; each firing annotates only new or changed images."""
    chosen = tasks_option(tasks)
    try:
        interval = parse_every(every)
    except ValueError as exc:
        fail(str(exc))
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        fail(f"schedule name {name!r}: use letters, digits, '.', '_' or '-'")
    target = sink or get_settings().sink
    if not target:
        fail("no sink: pass --sink postgresql://… or set IMAGEMILL_SINK")
    settings = get_settings()
    run_reporting_errors(lambda: _check_source(source, target, settings))
    celery = _beat_app()
    # stored in Redis, so without the sink's password: beat's own IMAGEMILL_SINK (or libpq) supplies it
    args = [name, source, ",".join(chosen), without_credentials(target)]
    RedBeatSchedulerEntry(name, SCAN_TASK, schedule(interval), args=args, app=celery).save()
    console.print(f"schedule [bold]{name}[/]: {source} every {every} → {redact_url(target)}", highlight=False)


def _check_source(source: str, sink: str, settings: Settings) -> None:
    """A schedule that could never run is refused now (UserError), not at its first firing: a source
    that does not exist (a folder, a manifest, an S3 bucket) or one the sink cannot write."""
    # boto3 (S3 sources) takes half a second to import; only `schedule add` needs it
    from imagemill.pipeline.sources import S3Source, open_source

    opened = open_source(source, settings)
    check_source_fits_sink(opened, sink)
    if isinstance(opened, S3Source):
        opened.check()


@app.command("list")
def list_schedules() -> None:
    """Every schedule, with when it last ran and when it is due."""
    celery = _beat_app()
    table = Table("name", "every", "source", "tasks", "sink", "last run", "due")
    for key in get_redis(celery).zrange(ensure_conf(celery).schedule_key, 0, -1):
        entry = RedBeatSchedulerEntry.from_key(key, app=celery)
        if entry.task != SCAN_TASK:  # Celery's own periodic housekeeping, not a scan
            continue
        name, source, tasks, sink = entry.args
        last = entry.last_run_at.strftime("%Y-%m-%d %H:%M:%S") if entry.total_run_count else "–"
        due = entry.due_at.strftime("%Y-%m-%d %H:%M:%S") if entry.due_at else "–"
        table.add_row(name, str(entry.schedule.run_every), source, tasks, redact_url(sink), last, due)
    stdout.print(table)


@app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="The schedule to delete.")]) -> None:
    """Delete a schedule (a scan already running finishes)."""
    celery = _beat_app()
    try:
        entry = RedBeatSchedulerEntry.from_key(RedBeatSchedulerEntry.generate_key(celery, name), app=celery)
    except KeyError:
        fail(f"no schedule {name} (see `imagemill schedule list`)")
    entry.delete()
    console.print(f"schedule {name} removed")


def beat(loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO") -> None:
    """Fire scheduled scans (run exactly one; a second waits on the lock) and run them."""
    settings = get_settings()
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "imagemill.producer",
        "worker",
        "--beat",
        "--queues",
        settings.schedule_queue,
        "--pool",
        "solo",
        "--loglevel",
        loglevel,
        "--hostname",
        f"beat-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
    ]
    os.execv(sys.executable, argv)
