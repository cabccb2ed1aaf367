"""Distributed mode's commands: `submit`, `status`, `jobs`, `cancel`.

`submit` enqueues a job for the workers; the others read and steer the job registry in Redis.
"""

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import TaskID
from rich.table import Column, Table

from imagemill.cli.annotate import ALL_TASKS, STRICT_HELP, tasks_option
from imagemill.cli.display import accounting_rows, console, fail, progress_bar, run_reporting_errors, stdout
from imagemill.core.accounting import Figures, bound
from imagemill.core.errors import ErrorKind, UserError
from imagemill.core.lanes import DEFAULT_LANE, LANE_NAMES, Lane, parse_lane
from imagemill.core.redaction import redact_url
from imagemill.core.tasks import Task

if TYPE_CHECKING:  # redis, pydantic-settings, boto3 and celery: each command imports what it uses when it runs
    from imagemill.core.jobs import Job, JobRegistry
    from imagemill.core.settings import Settings
    from imagemill.producer.submit import Submission

POLL_S = 0.5
WATCH_SOURCES = ("sqs://", "http://")  # the event sources of `imagemill watch`
BUDGET_HELP = (
    "Stop the job once its cost reaches this (IMAGEMILL_COST_PER_HOUR of each worker process): chunks in "
    "flight finish, the rest are not run; `imagemill budget JOB AMOUNT` goes on."
)
SINK_HELP = "postgresql://…, s3://bucket/prefix/, file:///shared/dir/ or s3tags:// [IMAGEMILL_SINK]."
PRIORITY_HELP = (
    f"The lane: {LANE_NAMES}. A worker takes its next chunk from the highest lane that has one;"
    " a running chunk is never interrupted."
)
SHARE_HELP = "The job's weight in its lane: jobs in one lane take turns, this one SHARE chunks per turn."


def lane_option(value: str) -> Lane:
    """The lane `--priority` names; a wrong name is the usage error that names the lanes."""
    try:
        return parse_lane(value)
    except UserError as exc:
        raise typer.BadParameter(str(exc)) from None


def registry_for(settings: "Settings") -> "JobRegistry":
    """The job registry, checked reachable (one clear line instead of a minute of retries)."""
    from imagemill.core.jobs import JobRegistry  # redis: when a command needs the registry, not for `--help`

    registry = JobRegistry(settings.registry_url)
    registry.check()
    return registry


def submit(
    source: Annotated[str, typer.Argument(help="A folder, s3://bucket/prefix, or a manifest.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated: caption, moderation, tags.")] = ALL_TASKS,
    sink: Annotated[str | None, typer.Option(help=SINK_HELP)] = None,
    chunk_size: Annotated[int | None, typer.Option(min=1, help="Images per chunk [IMAGEMILL_CHUNK_SIZE].")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until the job ends.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Re-annotate images the sink already has records for.")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help=STRICT_HELP)] = False,
    priority: Annotated[str, typer.Option(help=PRIORITY_HELP)] = DEFAULT_LANE.value,
    share: Annotated[int, typer.Option(min=1, help=SHARE_HELP)] = 1,
    budget: Annotated[float | None, typer.Option(min=0, help=BUDGET_HELP)] = None,
) -> None:
    """Enqueue a job for the workers; prints its id at once. Images the sink already holds
    (same etag and pipeline signature) are skipped unless --force."""
    lane = lane_option(priority)
    from imagemill.core.settings import get_settings  # pydantic-settings: when the command runs, not for `--help`

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    chosen = tasks_option(tasks)
    settings = get_settings()
    if chunk_size:
        settings = settings.model_copy(update={"chunk_size": chunk_size})
    target = sink or settings.sink
    if not target:
        fail("no sink: pass --sink postgresql://… or s3://bucket/prefix/, or set IMAGEMILL_SINK")
    if budget is not None and settings.cost_per_hour is None:
        # the workers price their own chunks; a pool where none sets a price never reaches a budget
        console.print("note: --budget counts what the workers' IMAGEMILL_COST_PER_HOUR says their chunks cost")
    run_reporting_errors(lambda: _submit(source, chosen, target, settings, wait, force, strict, lane, share, budget))


def _submit(
    source_spec: str,
    tasks: tuple[Task, ...],
    sink: str,
    settings: "Settings",
    wait: bool,
    force: bool = False,
    strict: bool = False,
    lane: Lane = DEFAULT_LANE,
    share: int = 1,
    budget: float | None = None,
) -> None:
    # boto3 (sources), celery and the sinks' drivers: loaded when a job is submitted, not for `--help`
    from imagemill.producer.submit import Submission, checked_source

    source = checked_source(source_spec, sink, settings, strict=strict)
    with registry_for(settings) as registry:
        submission = Submission(
            source, tasks, sink, settings, registry, force=force, lane=lane, share=share, budget=budget
        )
        _produce(submission, wait)


def _produce(submission: "Submission", wait: bool) -> None:
    """Register, print the job id at once, enqueue; with `wait`, follow the job to its end.
    The submission's broker connections are closed when it returns."""
    from imagemill.core.jobs import JobState  # loaded by the submission already (the registry's)

    with submission:
        job, created = submission.register()
        if created:
            where = f"{', '.join(job.tasks)} → {redact_url(job.sink)}, lane {job.lane}, share {job.share}"
            console.print(f"job [bold]{job.id}[/] submitted ({where})", highlight=False)
        else:
            role = "resuming its listing" if submission.producing else "its producer is alive; following"
            console.print(
                f"job [bold]{job.id}[/] is already running for this source and pipeline: {role}", highlight=False
            )
        typer.echo(job.id)
        if not wait:
            chunks = submission.run()
            console.print(f"enqueued {chunks} chunks; follow with: imagemill status {job.id}", highlight=False)
            return
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                submission.run(standby=True)
            except BaseException as exc:  # noqa: BLE001 - shown by the main thread after the bar ends
                errors.append(exc)

        producer = threading.Thread(target=produce, name="imagemill-producer", daemon=True)
        producer.start()
        final = follow(submission.registry, job.id)
        producer.join(timeout=5)
    if errors:
        raise errors[0]
    console.print(job_table(final))
    if final.state != JobState.DONE:
        raise typer.Exit(1)


def retry(
    job_id: Annotated[str, typer.Argument(help="The job whose failed images to redo.")],
    kind: Annotated[list[str] | None, typer.Option(help="Only these error kinds (repeatable).")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until the retry job ends.")] = False,
    budget: Annotated[
        float | None, typer.Option(min=0, help="For a job over its budget: the new total budget of its work.")
    ] = None,
) -> None:
    """Re-enqueue only the images of a job that ended with an error, as a new job. A job that went
    over its budget goes on instead: its source again, skipping what its sink holds (no budget
    unless --budget)."""
    # a misspelt kind would match nothing and look like "no failed images"
    unknown = sorted(set(kind or ()) - set(ErrorKind))
    if unknown:
        fail(f"--kind {', '.join(unknown)}: expected error kinds among {', '.join(ErrorKind)}")
    run_reporting_errors(lambda: _retry(job_id, set(kind or ()), wait, budget))


def _retry(job_id: str, kinds: set[str], wait: bool, budget: float | None = None) -> None:
    # pydantic-settings, boto3, celery and the sinks' drivers: loaded when a retry runs, not for `--help`
    from imagemill.core.jobs import JobState
    from imagemill.core.settings import get_settings
    from imagemill.pipeline.sources import RefListSource
    from imagemill.producer.submit import Submission, failed_refs

    settings = get_settings()
    with registry_for(settings) as registry:
        job = _get_job(job_id, registry)
        if job.state == JobState.OVER_BUDGET:
            _go_on(job, budget, settings, registry, wait)
            return
        refs = failed_refs(job, settings, kinds)
        if not refs:
            console.print(f"job {job_id} has no failed images to retry")
            return
        console.print(f"retrying {len(refs):,} failed images of job {job_id}")
        source = RefListSource(f"retry of {job_id}", refs)
        # in the lane and with the share of the job it retries
        _produce(Submission(source, job.tasks, job.sink, settings, registry, lane=job.lane, share=job.share), wait)


def budget(
    job_id: Annotated[str, typer.Argument(help="A running job, or one that went over its budget.")],
    amount: Annotated[float, typer.Argument(min=0, help="The new total budget.")],
    wait: Annotated[bool, typer.Option("--wait", help="Show progress until the job goes on to its end.")] = False,
) -> None:
    """Give a job a new budget: a running job's cap changes; a job over its budget goes on as a new
    job with the rest of AMOUNT, skipping every image its sink already holds."""
    run_reporting_errors(lambda: _budget(job_id, amount, wait))


def _budget(job_id: str, amount: float, wait: bool) -> None:
    # pydantic-settings and the registry (redis): loaded when the command runs, not for `--help`
    from imagemill.core.jobs import JobState
    from imagemill.core.settings import get_settings

    settings = get_settings()
    with registry_for(settings) as registry:
        job = _get_job(job_id, registry)
        if job.state == JobState.RUNNING:
            if not registry.set_budget(job_id, amount - job.spent_before):
                raise UserError(f"job {job_id} ended while its budget changed; see `imagemill status {job_id}`")
            console.print(f"job {job_id}: budget {amount:,.2f}, spent {(job.cost or 0) + job.spent_before:,.2f}")
            return
        if job.state != JobState.OVER_BUDGET:
            raise UserError(f"job {job_id} is {job.state}: only a running job or one over its budget takes a budget")
        _go_on(job, amount, settings, registry, wait)


def _go_on(job: "Job", total: float | None, settings: "Settings", registry: "JobRegistry", wait: bool) -> None:
    """A job over its budget goes on: its source listed again, what the sink holds skipped (the same
    uri, etag and signature: nothing annotated twice), under the rest of `total` (None: no cap)."""
    # boto3 (sources), celery and the sinks' drivers: loaded when a job goes on, not for `--help`
    from imagemill.producer.submit import Submission, checked_source

    spent = job.spent_before + (job.cost or 0.0)
    if total is not None and total <= spent:
        raise UserError(f"job {job.id} has spent {spent:,.2f}: a budget that goes on must be above that")
    if job.source.startswith("retry of "):
        raise UserError(f"job {job.id} retried another job's images: retry that job ({job.source[9:]}) instead")
    source = checked_source(job.source, with_own_sink(job.sink, settings), settings)
    rest = None if total is None else total - spent
    console.print(f"job {job.id} went over its budget after {job.processed:,} images; going on", highlight=False)
    _produce(
        Submission(
            source, job.tasks, job.sink, settings, registry, lane=job.lane, share=job.share, budget=rest, continues=job
        ),
        wait,
    )


def with_own_sink(sink: str, settings: "Settings") -> str:
    """The job's sink as stored (no password) with this environment's credentials."""
    from imagemill.core.credentials import with_own_credentials  # with the registry's modules already

    return with_own_credentials(sink, settings.sink)


def follow(registry: "JobRegistry", job_id: str) -> "Job":
    """A live bar of images processed / queued until the job leaves `running`."""
    from imagemill.core.jobs import JobState  # loaded with the registry already

    with progress_bar(f"job {job_id}") as (progress, bar):
        while True:
            job = _registered(registry, job_id)
            total = job.queued if job.listing_done else None
            progress.update(TaskID(bar), completed=job.processed, total=total)
            if job.state != JobState.RUNNING:
                progress.update(TaskID(bar), completed=job.processed, total=job.queued)
                return job
            time.sleep(POLL_S)


JSON_OPTION = typer.Option("--json", help="One JSON document on stdout, for scripts.")


def status(
    job_id: Annotated[str, typer.Argument(help="The id `submit` printed.")],
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Totals, rate, ETA and state of one job."""
    with _registry() as registry:
        job = _get_job(job_id, registry)
        latency = latencies(registry, job)
    if as_json:
        typer.echo(json.dumps(job_document(job) | {"latency": latency}))
        return
    stdout.print(job_table(job, latency))


def jobs(
    limit: Annotated[int, typer.Option(min=1, help="How many recent jobs.")] = 20,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """The most recent jobs, newest first."""
    with _registry() as registry:
        recent = registry.recent(limit)
    if as_json:
        typer.echo(json.dumps([job_document(job) for job in recent]))
        return
    # the id is what `status`, `cancel` and `retry` need: never cropped, whatever the width (pipes get 80)
    id_column = Column("job", no_wrap=True, min_width=max((len(job.id) for job in recent), default=3))
    table = Table(
        id_column,
        "state",
        "lane ×share",
        "tasks",
        "source",
        "processed",
        "queued",
        "failed",
        "cost",
        "per 1,000",
        "created",
        Column("kept", no_wrap=True),  # "while running" on one line: the other columns give way
    )
    for job in recent:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at))
        table.add_row(
            job.id,
            job.state,
            f"{job.lane} ×{job.share}",  # one column: the table already fills a pipe's 80
            ",".join(job.tasks),
            job.source,
            f"{job.processed:,}",
            f"{job.queued:,}",
            f"{job.failed:,}",
            f"{job.cost:,.2f}" if job.cost is not None else "–",
            f"{job.cost_per_1000:,.4f}" if job.cost_per_1000 is not None else "–",
            created,
            kept(job),
        )
    stdout.print(table)


def job_document(job: "Job") -> dict[str, Any]:
    """A job for `--json`: every registry field (the sink without its password) and the derived
    `processed`, `rate`, `eta_s` and `expires_at`."""
    document = job.model_dump(mode="json")
    document["sink"] = redact_url(job.sink)
    document |= {"processed": job.processed, "rate": job.rate, "eta_s": job.eta_s, "expires_at": job.expires_at}
    document |= {
        "cost": job.cost,
        "cost_per_1000": job.cost_per_1000,
        "accounting": job.figures.to_document() if job.accounting else None,
        "workers": {name: Figures.from_fields(flat).to_document() | {"cost": flat.get("cost")}
                    for name, flat in job.workers.items()},
    }  # fmt: skip
    return document


def kept(job: "Job") -> str:
    """How long the registry keeps a job: while it runs, then IMAGEMILL_JOB_RETENTION after it ends."""
    if job.expires_at is None or job.retention_s is None:
        return "while running"
    until = time.strftime("%m-%d %H:%M", time.localtime(job.expires_at))
    return f"{duration(job.retention_s)}, until {until}"


def duration(seconds: float) -> str:
    """7d, 36h, 90m, 45s: the largest unit that divides it, else seconds."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def cancel(job_id: Annotated[str, typer.Argument(help="The job to stop.")]) -> None:
    """Stop a job: chunks not yet started are dropped; running ones finish."""
    with _registry() as registry:
        job = _get_job(job_id, registry)
        if not registry.cancel(job_id):
            fail(f"job {job_id} is {job.state}, not running")
    console.print(f"job {job_id} cancelled after {job.processed:,} of {job.queued:,} images")


def _registry() -> "JobRegistry":
    """The checked registry of the environment's settings; an unreachable Redis is one line and exit 2."""
    from imagemill.core.settings import get_settings  # pydantic-settings: when the command runs, not for `--help`

    return run_reporting_errors(lambda: registry_for(get_settings()))


def _get_job(job_id: str, registry: "JobRegistry") -> "Job":
    job = registry.get(job_id)
    if job is None:
        fail(f"no job {job_id} (see `imagemill jobs`)")
    return job


def _registered(registry: "JobRegistry", job_id: str) -> "Job":
    # the job was registered before it was followed; only a flushed Redis loses it
    job = registry.get(job_id)
    if job is None:
        raise UserError(f"job {job_id} is gone from the job registry")
    return job


def latencies(registry: "JobRegistry", job: "Job") -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Queue wait and upload-to-record of the job and of its lane: p50, p95 (seconds) and how many
    samples, over the newest samples the registry keeps (`status` shows them, `--json` gives them)."""
    from imagemill.core.jobs import LATENCY_KINDS  # loaded with the registry already

    found: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for kind in LATENCY_KINDS:
        found[kind] = {
            "job": percentiles(registry.latencies(kind, job_id=job.id)),
            "lane": percentiles(registry.latencies(kind, lane=job.lane)),
        }
    return found


def percentiles(samples: list[float]) -> dict[str, float | int | None]:
    """p50 and p95 (nearest rank) of `samples`, and their count; None without samples."""
    ordered = sorted(samples)

    def rank(p: int) -> float | None:
        return ordered[max(0, -(-len(ordered) * p // 100) - 1)] if ordered else None

    return {"p50": rank(50), "p95": rank(95), "samples": len(ordered)}


def _latency_row(figures: dict[str, dict[str, float | int | None]]) -> str:
    """`job p50 1.2 s, p95 3.4 s (n) · lane …`, or – where nothing was measured."""
    parts = []
    for owner in ("job", "lane"):
        f = figures[owner]
        if f["samples"]:
            parts.append(f"{owner} p50 {f['p50']:,.2f} s, p95 {f['p95']:,.2f} s ({f['samples']:,})")
    return " · ".join(parts) or "–"


def job_table(job: "Job", latency: dict[str, dict[str, dict[str, float | int | None]]] | None = None) -> Table:
    """The rows `status` shows for one job: state, lane, counts by outcome, chunks, rate, ETA and latencies."""
    table = Table(title=f"job {job.id}", show_header=False, title_justify="left")
    # a watch's job (`imagemill watch`) lists nothing: it counts uploads as they come, and never ends
    watching = job.source.startswith(WATCH_SOURCES)
    table.add_column(style="bold")
    table.add_column()
    rows = {
        "state": job.state.value + (f" ({job.error})" if job.error else ""),
        "lane": f"{job.lane} (share {job.share})",
        "kept": kept(job),
        "source": job.source,
        "tasks": ", ".join(job.tasks),
        "sink": redact_url(job.sink),
        "signature": job.signature or "–",
        "listed": f"{job.listed:,}" + ("" if job.listing_done else " (watching…)" if watching else " (listing…)"),
        "queued": f"{job.queued:,}",
        "skipped": f"{job.skipped:,}",
        "annotated": f"{job.annotated:,}",
        "failed": f"{job.failed:,}",
    }
    rows |= {f"  {kind}": f"{n:,}" for kind, n in sorted(job.failed_by_kind.items())}
    rows |= {
        "chunks": (
            f"{job.chunks_done:,} done ({job.chunks_dead_lettered:,} dead-lettered), "
            f"{job.chunks_cancelled:,} cancelled, {job.chunks_total or job.chunks_queued:,} total"
        ),
        "rate": f"{job.rate:,.1f} images/s" if job.rate else "–",
        "eta": f"{job.eta_s:,.0f} s" if job.eta_s is not None and not watching else "–",
    }
    if latency is not None:
        rows["queue wait"] = _latency_row(latency["queue_wait"])
        rows["upload to record"] = _latency_row(latency["upload_to_record"])
    rows |= accounting_rows(job.figures if job.accounting else None, job.cost, job.processed)
    if job.budget is not None:
        rows["budget"] = f"{job.budget + job.spent_before:,.2f}" + (
            f" ({job.spent_before:,.2f} spent by job {job.continues})" if job.continues else ""
        )
    elif job.continues:
        rows["continues"] = f"job {job.continues}"
    if len(job.workers) > 1:
        for name, flat in sorted(job.workers.items()):
            figures = Figures.from_fields(flat)
            rows[f"  worker {name}"] = f"{figures.images:,} images, " + (bound(figures) or "–")
    for key, value in rows.items():
        table.add_row(key, value)
    return table
