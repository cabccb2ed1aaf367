"""`imagemill annotate SOURCE`: local mode (`imagemill.local`), the whole data path on this machine.

The arguments, the spinner while the models load, the progress bar and the summary; no Redis, no database.
"""

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress, TaskID

from imagemill.cli.display import accounting_rows, console, fail, progress_bar, run_reporting_errors, summary_table
from imagemill.core.redaction import redact_url
from imagemill.core.tasks import DEFAULT_TASKS, Task, parse_tasks

if TYPE_CHECKING:  # pydantic-settings, boto3 and multiprocessing: imported when `annotate` runs
    from imagemill.core.gpus import Slot
    from imagemill.core.settings import Settings
    from imagemill.pipeline.sources import Source

ALL_TASKS = ",".join(t.value for t in DEFAULT_TASKS)
SOURCE_HELP = "A folder, s3://bucket/prefix, or a manifest (.jsonl, .csv, .txt, also .gz or .zst; .parquet)."
GPUS_HELP = "cpu (this process), all, GPU indices such as 0,2 (one engine process each), or cpu:N (N CPU processes)."
STRICT_HELP = "Read a manifest through first and stop (exit 2) at its first bad line, before annotating."


def tasks_option(value: str) -> tuple[Task, ...]:
    try:
        return parse_tasks(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def annotate(
    source: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    tasks: Annotated[
        str, typer.Option(help="Comma-separated: caption, moderation, tags, embedding (asked by name).")
    ] = ALL_TASKS,
    out: Annotated[
        str,
        typer.Option(
            help="Where records go: a .jsonl or .parquet file, or postgresql://… (the store distributed workers write)."
        ),
    ] = "annotations.jsonl",
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Images per model batch [IMAGEMILL_BATCH_SIZE].")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N [IMAGEMILL_DEVICE].")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Re-annotate images OUT already has records for.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help=STRICT_HELP)] = False,
    gpus: Annotated[str, typer.Option(help=GPUS_HELP)] = "cpu",
) -> None:
    """Annotate every image in SOURCE here (in this process, or one per GPU) and write one record per image."""
    # the settings (pydantic-settings) and the pool load when the command runs, not for `--help`
    from imagemill.core.settings import check_device, get_settings
    from imagemill.local.pool import plan_children

    chosen = tasks_option(tasks)
    if device is not None:
        try:
            check_device(device)
        except ValueError as exc:
            fail(f"--device {device}: {exc}")
    try:
        slots = plan_children(gpus)
    except ValueError as exc:
        fail(str(exc))
    overrides = {k: v for k, v in {"batch_size": batch_size, "device": device}.items() if v is not None}
    settings = get_settings().model_copy(update=overrides)
    run_reporting_errors(
        lambda: _run_local(source, chosen, out, settings, quiet=quiet, force=force, strict=strict, slots=slots)
    )


def _run_local(
    source_spec: str,
    tasks: tuple[Task, ...],
    out: str,
    settings: "Settings",
    *,
    quiet: bool,
    force: bool = False,
    strict: bool = False,
    slots: "list[Slot] | None" = None,
) -> None:
    """The local run (`imagemill.local.run`) with a spinner while the models load, the progress bar
    and the summary."""
    # boto3 (S3 sources) takes half a second to import, torch seconds: loaded when a run starts
    from imagemill.local.run import LocalRun

    local = LocalRun(source_spec, tasks, out, settings, force=force, strict=strict, slots=slots)
    with console.status(f"loading models for {', '.join(tasks)}…", spinner="dots"):
        local.load()

    def interrupted(partial: Path | None) -> None:
        if partial is None:  # a database: each write was committed
            where = redact_url(out)
            console.print(f"interrupted: the records written so far are in {where}; a new run skips them")
            return
        console.print(f"interrupted: {out} left as it was; this run's records are in {partial}", highlight=False)

    with progress_bar("annotating", disable=quiet) as (progress, bar):
        if not quiet:  # the count costs a second listing; only a visible bar needs it
            _count_in_background(local.source, progress, bar)
        done = local.run(
            on_skipped=lambda refs: progress.advance(bar, len(refs)),
            on_record=lambda _: progress.advance(bar),
            interrupted=interrupted,
        )
    title = f"{local.source} → {redact_url(out)}"
    processed = sum(n for kind, n in done.outcomes.items() if kind != "skipped")
    extra = {"signature": done.signature} | accounting_rows(done.figures, done.cost, processed)
    console.print(summary_table(title, done.outcomes, done.seconds, extra))


def _count_in_background(source: "Source", progress: Progress, bar: TaskID) -> None:
    """Count the source in a second, cheap listing pass so the bar can show a total and an ETA."""

    def count() -> None:
        total = 0
        try:
            for total, _ in enumerate(source.refs(), 1):
                if total % 1000 == 0:
                    progress.update(bar, total=total)
        except Exception:  # noqa: BLE001 - the real listing reports source errors; this pass only estimates
            return
        progress.update(bar, total=total)

    threading.Thread(target=count, name="imagemill-count", daemon=True).start()
