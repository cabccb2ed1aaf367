"""`imagemill annotate SOURCE`: local mode, the whole data path in this one process.

No Redis, no database: list the source, run the engine, write a JSONL or Parquet file.
"""

import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress, TaskID

from imagemill.cli.display import console, fail, progress_bar, run_reporting_errors, summary_table
from imagemill.core.schemas import DEFAULT_TASKS, Task, parse_tasks
from imagemill.core.settings import Settings, check_device, get_settings
from imagemill.core.stores import open_file_writer
from imagemill.pipeline.run import run
from imagemill.worker.local_pool import LocalPool, plan_children

if TYPE_CHECKING:  # the module imports boto3; run_local imports it when it runs
    from imagemill.pipeline.engine import Engine
    from imagemill.pipeline.sources import Source
    from imagemill.worker.supervisor import Slot

ALL_TASKS = ",".join(t.value for t in DEFAULT_TASKS)
WRITE_EVERY = 64  # records per write: small enough to lose little on a crash
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
    out: Annotated[Path, typer.Option(help="Where records go: a .jsonl or .parquet file.")] = Path("annotations.jsonl"),
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
        lambda: run_local(source, chosen, out, settings, quiet=quiet, force=force, strict=strict, slots=slots)
    )


def run_local(
    source_spec: str,
    tasks: tuple[Task, ...],
    out: Path,
    settings: Settings,
    *,
    quiet: bool,
    force: bool = False,
    strict: bool = False,
    slots: "list[Slot] | None" = None,
) -> Counter[str]:
    """List, annotate and write; returns outcome counts ('annotated', 'skipped' or the error kind).

    Unless `force`, images OUT already holds an error-free record for (same etag and signature)
    are skipped and their records kept. With `strict`, a manifest's first bad line is a SourceError
    before any model loads; without, each bad line is one `bad_reference` record. With `slots`, one
    engine process per slot annotates (`LocalPool`); this process lists, skips and writes as before."""
    # boto3 (S3 sources) takes half a second to import
    from imagemill.pipeline.manifests import check as check_manifest
    from imagemill.pipeline.sources import open_source

    source = open_source(source_spec, settings)
    if strict:
        check_manifest(source)

    with console.status(f"loading models for {', '.join(tasks)}…", spinner="dots"):
        engine = _load_engine(settings, tasks, slots)
    writer = open_file_writer(str(out), keep_existing=not force, embedding_dtype=settings.embedding_dtype)
    started = time.perf_counter()
    try:
        with engine, progress_bar("annotating", disable=quiet) as (progress, bar):
            if not quiet:  # the count costs a second listing; only a visible bar needs it
                _count_in_background(source, progress, bar)
            result = run(
                source.refs(),
                engine,
                writer,
                write_every=WRITE_EVERY,
                skip=None if force else writer,
                on_skipped=lambda refs: progress.advance(bar, len(refs)),
                on_record=lambda _: progress.advance(bar),
            )
    except BaseException:
        # an interrupted run must not replace a complete earlier output with a partial one
        partial = writer.abort()
        console.print(f"interrupted: {out} left as it was; this run's records are in {partial}", highlight=False)
        raise
    writer.close()
    elapsed = time.perf_counter() - started
    console.print(summary_table(f"{source} → {out}", result.outcomes, elapsed, {"signature": engine.signature}))
    return result.outcomes


def _load_engine(settings: Settings, tasks: tuple[Task, ...], slots: "list[Slot] | None") -> "Engine | LocalPool":
    """The models in this process (`slots` None), or one engine process per slot."""
    if slots is not None:
        return LocalPool(settings, tasks, slots)
    # torch and transformers (the engine's model runners) take seconds to import: `--help` must not
    # wait, nor a source that fails first, nor a parent whose children run the models
    from imagemill.pipeline.engine import Engine

    return Engine(settings, tasks)


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
