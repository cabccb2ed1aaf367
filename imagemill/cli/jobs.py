"""Distributed mode's commands: `submit`, `status`, `jobs`, `cancel`.

`submit` enqueues a job for the workers; the others read and steer the job registry in Redis.
"""

import json
import logging
import threading
import time
from typing import Annotated, Any

import typer
from rich.progress import TaskID
from rich.table import Column, Table

from imagemill.cli.annotate import ALL_TASKS, STRICT_HELP, tasks_option
from imagemill.cli.display import console, fail, progress_bar, run_reporting_errors, stdout
from imagemill.core.credentials import with_own_credentials
from imagemill.core.errors import ErrorKind, UserError
from imagemill.core.jobs import Job, JobRegistry, JobState
from imagemill.core.redaction import redact_url
from imagemill.core.schemas import ImageRef, Task
from imagemill.core.settings import Settings, get_settings
from imagemill.core.stores import SearchableStore, open_writer
from imagemill.pipeline.manifests import check as check_manifest
from imagemill.pipeline.sources import RefListSource, open_source
from imagemill.producer.submit import Submission, check_source_fits_sink

POLL_S = 0.5
SINK_HELP = "postgresql://…, s3://bucket/prefix/, file:///shared/dir/ or s3tags:// [IMAGEMILL_SINK]."


def registry_for(settings: Settings) -> JobRegistry:
    """The job registry, checked reachable (one clear line instead of a minute of retries)."""
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
) -> None:
    """Enqueue a job for the workers; prints its id at once. Images the sink already holds
    (same etag and pipeline signature) are skipped unless --force."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    chosen = tasks_option(tasks)
    settings = get_settings()
    if chunk_size:
        settings = settings.model_copy(update={"chunk_size": chunk_size})
    target = sink or settings.sink
    if not target:
        fail("no sink: pass --sink postgresql://… or s3://bucket/prefix/, or set IMAGEMILL_SINK")
    run_reporting_errors(lambda: _submit(source, chosen, target, settings, wait, force, strict))


def _submit(
    source_spec: str,
    tasks: tuple[Task, ...],
    sink: str,
    settings: Settings,
    wait: bool,
    force: bool = False,
    strict: bool = False,
) -> None:
    if "://" not in sink:
        raise UserError(
            f"sink {sink}: workers need a shared sink: postgresql://…, s3://bucket/prefix/ or file:///shared/dir/"
        )
    source = open_source(source_spec, settings)
    check_source_fits_sink(source, sink)  # before any service is asked anything
    if strict:
        check_manifest(source)  # the whole manifest read before the job exists
    with open_writer(sink) as writer:
        writer.check()  # a bad or unreachable sink fails here, before anything is queued
    with registry_for(settings) as registry:
        _produce(Submission(source, tasks, sink, settings, registry, force=force), wait)


def _produce(submission: Submission, wait: bool) -> None:
    """Register, print the job id at once, enqueue; with `wait`, follow the job to its end.
    The submission's broker connections are closed when it returns."""
    with submission:
        job, created = submission.register()
        if created:
            where = f"{', '.join(job.tasks)} → {redact_url(job.sink)}"
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
) -> None:
    """Re-enqueue only the images of a job that ended with an error, as a new job."""
    # a misspelt kind would match nothing and look like "no failed images"
    unknown = sorted(set(kind or ()) - set(ErrorKind))
    if unknown:
        fail(f"--kind {', '.join(unknown)}: expected error kinds among {', '.join(ErrorKind)}")
    run_reporting_errors(lambda: _retry(job_id, set(kind or ()), wait))


def _retry(job_id: str, kinds: set[str], wait: bool) -> None:
    settings = get_settings()
    with registry_for(settings) as registry:
        job = _get_job(job_id, registry)
        with open_writer(with_own_credentials(job.sink, settings.sink)) as store:
            if not isinstance(store, SearchableStore):
                raise UserError(f"the sink {redact_url(job.sink)} cannot be searched for failed records")
            failed = [r for r in store.failed_records(job_id) if r.error and (not kinds or r.error.kind in kinds)]
        # a bad manifest line names no image to fetch again: the manifest is what needs fixing
        failed = [r for r in failed if r.error and r.error.kind != ErrorKind.BAD_REFERENCE]
        if not failed:
            console.print(f"job {job_id} has no failed images to retry")
            return
        refs = tuple(ImageRef(uri=r.uri, etag=r.etag) for r in failed)
        console.print(f"retrying {len(refs):,} failed images of job {job_id}")
        source = RefListSource(f"retry of {job_id}", refs)
        _produce(Submission(source, job.tasks, job.sink, settings, registry), wait)


def follow(registry: JobRegistry, job_id: str) -> Job:
    """A live bar of images processed / queued until the job leaves `running`."""
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
    if as_json:
        typer.echo(json.dumps(job_document(job)))
        return
    stdout.print(job_table(job))


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
    table = Table(id_column, "state", "tasks", "source", "processed", "queued", "failed", "created", "kept")
    for job in recent:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at))
        table.add_row(
            job.id,
            job.state,
            ",".join(job.tasks),
            job.source,
            f"{job.processed:,}",
            f"{job.queued:,}",
            f"{job.failed:,}",
            created,
            kept(job),
        )
    stdout.print(table)


def job_document(job: Job) -> dict[str, Any]:
    """A job for `--json`: every registry field (the sink without its password) and the derived
    `processed`, `rate`, `eta_s` and `expires_at`."""
    document = job.model_dump(mode="json")
    document["sink"] = redact_url(job.sink)
    document |= {"processed": job.processed, "rate": job.rate, "eta_s": job.eta_s, "expires_at": job.expires_at}
    return document


def kept(job: Job) -> str:
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


def _registry() -> JobRegistry:
    """The checked registry of the environment's settings; an unreachable Redis is one line and exit 2."""
    return run_reporting_errors(lambda: registry_for(get_settings()))


def _get_job(job_id: str, registry: JobRegistry) -> Job:
    job = registry.get(job_id)
    if job is None:
        fail(f"no job {job_id} (see `imagemill jobs`)")
    return job


def _registered(registry: JobRegistry, job_id: str) -> Job:
    # the job was registered before it was followed; only a flushed Redis loses it
    job = registry.get(job_id)
    if job is None:
        raise UserError(f"job {job_id} is gone from the job registry")
    return job


def job_table(job: Job) -> Table:
    """The rows `status` shows for one job: state, counts by outcome, chunks, rate and ETA."""
    table = Table(title=f"job {job.id}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = {
        "state": job.state.value + (f" ({job.error})" if job.error else ""),
        "kept": kept(job),
        "source": job.source,
        "tasks": ", ".join(job.tasks),
        "sink": redact_url(job.sink),
        "signature": job.signature or "–",
        "listed": f"{job.listed:,}" + ("" if job.listing_done else " (listing…)"),
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
        "eta": f"{job.eta_s:,.0f} s" if job.eta_s is not None else "–",
    }
    for key, value in rows.items():
        table.add_row(key, value)
    return table
