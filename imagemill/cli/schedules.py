"""`imagemill schedule add|list|remove` and `imagemill beat`: scheduled incremental scans.

Schedules live in Redis (RedBeat); `imagemill beat` fires them, and a lock keeps it to one.
"""

import os
import re
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from imagemill.cli.annotate import ALL_TASKS, tasks_option
from imagemill.cli.display import console, fail, run_reporting_errors, stdout
from imagemill.cli.jobs import PRIORITY_HELP, SINK_HELP, lane_option
from imagemill.core.lanes import DEFAULT_LANE
from imagemill.core.redaction import redact_url

if TYPE_CHECKING:  # celery: imported by the schedule commands when they run (see `_beat_app`)
    from celery import Celery

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


def _beat_app() -> "Celery":
    """The producer's Celery app, its schedules' Redis checked reachable (one line, exit 2, if not)."""
    # celery, redbeat and pydantic-settings take a second to import: loaded by the schedule commands, not for `--help`
    from imagemill.core.settings import get_settings
    from imagemill.producer.schedules import beat_app

    settings = get_settings()
    return run_reporting_errors(lambda: beat_app(settings))


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="A name for the schedule.")],
    source: Annotated[str, typer.Argument(help="A folder, s3://bucket/prefix, or a manifest.")],
    every: Annotated[str, typer.Option(help="How often: 30s, 15m, 1h, 1d.")] = "1h",
    tasks: Annotated[str, typer.Option(help="Comma-separated: caption, moderation, tags.")] = ALL_TASKS,
    sink: Annotated[str | None, typer.Option(help=SINK_HELP)] = None,
    priority: Annotated[str, typer.Option(help=PRIORITY_HELP + " Each firing's job goes there.")] = DEFAULT_LANE.value,
) -> None:
    """Scan SOURCE every so often; each firing annotates only new or changed images."""
    chosen = tasks_option(tasks)
    lane = lane_option(priority)
    try:
        interval = parse_every(every)
    except ValueError as exc:
        fail(str(exc))
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        fail(f"schedule name {name!r}: use letters, digits, '.', '_' or '-'")
    from imagemill.core.settings import get_settings  # pydantic-settings: when the command runs, not for `--help`

    target = sink or get_settings().sink
    if not target:
        fail("no sink: pass --sink postgresql://… or set IMAGEMILL_SINK")
    settings = get_settings()
    # boto3 (S3 sources), celery and redbeat take a second to import; only the schedule commands need them
    from imagemill.producer.schedules import add_schedule, check_source

    run_reporting_errors(lambda: check_source(source, target, settings))
    add_schedule(_beat_app(), name, source, chosen, target, interval, lane)
    console.print(
        f"schedule [bold]{name}[/]: {source} every {every} → {redact_url(target)}, lane {lane}", highlight=False
    )


@app.command("list")
def list_schedules() -> None:
    """Every schedule, with when it last ran and when it is due."""
    from imagemill.producer.schedules import list_schedules  # celery and redbeat: see `_beat_app`

    table = Table("name", "every", "source", "tasks", "sink", "lane", "last run", "due")
    for entry in list_schedules(_beat_app()):
        table.add_row(
            entry.name,
            str(entry.every),
            entry.source,
            entry.tasks,
            redact_url(entry.sink),
            entry.lane,
            entry.last_run,
            entry.due,
        )
    stdout.print(table)


@app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="The schedule to delete.")]) -> None:
    """Delete a schedule (a scan already running finishes)."""
    from imagemill.producer.schedules import remove_schedule  # celery and redbeat: see `_beat_app`

    if not remove_schedule(_beat_app(), name):
        fail(f"no schedule {name} (see `imagemill schedule list`)")
    console.print(f"schedule {name} removed")


def beat(loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO") -> None:
    """Fire scheduled scans (run exactly one; a second waits on the lock) and run them."""
    from imagemill.core.settings import get_settings  # pydantic-settings: when the command runs, not for `--help`

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
