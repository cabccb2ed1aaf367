"""Scheduled scans as stored in Redis (RedBeat entries): added after their source is checked,
listed with when they last ran and are due, removed by name.

`imagemill beat` fires them (`producer.beat`, `producer.scans`); `imagemill schedule` shows them.
"""

from dataclasses import dataclass
from datetime import timedelta

from celery import Celery
from celery.schedules import schedule
from redbeat import RedBeatSchedulerEntry
from redbeat.schedulers import ensure_conf, get_redis

from imagemill.core.connections import check_reachable
from imagemill.core.credentials import without_credentials
from imagemill.core.lanes import DEFAULT_LANE, Lane
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task
from imagemill.pipeline.sources import S3Source, open_source
from imagemill.producer.beat import SCAN_TASK, make_producer_app
from imagemill.producer.submit import check_source_fits_sink


@dataclass(frozen=True)
class Scheduled:
    """One schedule as `imagemill schedule list` shows it (the sink as stored: without a password)."""

    name: str
    every: timedelta
    source: str
    tasks: str
    sink: str
    last_run: str  # "–" before its first firing
    due: str
    lane: Lane = DEFAULT_LANE


def beat_app(settings: Settings) -> Celery:
    """The producer's Celery app, its schedules' Redis checked reachable (UserError, one line, if not)."""
    check_reachable(settings.registry_url)
    celery = make_producer_app(settings)
    ensure_conf(celery)
    return celery


def check_source(source: str, sink: str, settings: Settings) -> None:
    """A schedule that could never run is refused now (UserError), not at its first firing: a source
    that does not exist (a folder, a manifest, an S3 bucket) or one the sink cannot write."""
    opened = open_source(source, settings)
    check_source_fits_sink(opened, sink)
    if isinstance(opened, S3Source):
        opened.check()


def add_schedule(
    celery: Celery,
    name: str,
    source: str,
    tasks: tuple[Task, ...],
    sink: str,
    every: timedelta,
    lane: Lane = DEFAULT_LANE,
) -> None:
    """Store (or replace) the schedule `name`, its firings' jobs going to `lane`; stored in Redis, so
    without the sink's password: beat's own IMAGEMILL_SINK (or libpq) supplies it."""
    args = [name, source, ",".join(tasks), without_credentials(sink), lane.value]
    RedBeatSchedulerEntry(name, SCAN_TASK, schedule(every), args=args, app=celery).save()


def list_schedules(celery: Celery) -> list[Scheduled]:
    """Every scan schedule, in Redis' order."""
    found = []
    for key in get_redis(celery).zrange(ensure_conf(celery).schedule_key, 0, -1):
        entry = RedBeatSchedulerEntry.from_key(key, app=celery)
        if entry.task != SCAN_TASK:  # Celery's own periodic housekeeping, not a scan
            continue
        # a schedule stored before the lanes has four arguments: its firings go to the default lane
        name, source, tasks, sink, *lane = entry.args
        last = entry.last_run_at.strftime("%Y-%m-%d %H:%M:%S") if entry.total_run_count else "–"
        due = entry.due_at.strftime("%Y-%m-%d %H:%M:%S") if entry.due_at else "–"
        chosen = Lane(lane[0]) if lane else DEFAULT_LANE
        found.append(Scheduled(name, entry.schedule.run_every, source, tasks, sink, last, due, chosen))
    return found


def remove_schedule(celery: Celery, name: str) -> bool:
    """Delete the schedule `name` (a scan already running finishes); False when there is none."""
    try:
        entry = RedBeatSchedulerEntry.from_key(RedBeatSchedulerEntry.generate_key(celery, name), app=celery)
    except KeyError:
        return False
    entry.delete()
    return True
