"""`imagemill export RECORDS --format hf|webdataset --out DIR`: records and their images for training.

The writing is `pipeline.exports`; this module wires the arguments, the progress bar and the summary.
"""

import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from imagemill.cli.display import console, fail, progress_bar, run_reporting_errors
from imagemill.core.schemas import Record
from imagemill.core.settings import get_settings
from imagemill.core.storage import ObjectReader
from imagemill.pipeline.exports import ExportFormat, ExportReport, Options, Skipped, export
from imagemill.pipeline.record_filter import parse_where

# `--out s3://b/x` reaches us as the path `s3:/b/x` (Path folds the double slash)
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def export_command(
    records: Annotated[
        str,
        typer.Argument(help="Records: a .jsonl/.parquet file, postgresql://…, s3://bucket/prefix/ or file:///dir/."),
    ],
    fmt: Annotated[
        ExportFormat,
        typer.Option("--format", help="hf: a datasets dataset (save_to_disk); webdataset: tar shards."),
    ],
    out: Annotated[Path, typer.Option(help="A new (or empty) directory for the export.")],
    shard_size: Annotated[
        int | None,
        typer.Option(min=1, help="Samples per shard [webdataset: 10,000; hf: datasets' 500 MB shards]."),
    ] = None,
    only_ok: Annotated[bool, typer.Option("--only-ok", help="Leave out error records.")] = False,
    where: Annotated[
        list[str] | None,
        typer.Option(help="field=value or field!=value, repeatable, all must hold: flagged, error, tag, format, job."),
    ] = None,
    history: Annotated[
        bool, typer.Option("--history", help="Every record kept, not only the current one per image.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Export RECORDS with their images' original bytes as a Hugging Face dataset or WebDataset shards."""
    if URL.match(str(out)):
        fail(f"--out {out}: a local directory, not a URL (export here, then copy it, e.g. with aws s3 sync)")
    conditions = run_reporting_errors(lambda: parse_where(where or []))
    settings = get_settings()
    options = Options(where=conditions, only_ok=only_ok, shard_size=shard_size, threads=settings.fetch_threads)
    # the reader module imports pyarrow: loaded when an export runs, not for `imagemill --help`
    from imagemill.core.stores.reading import read_records

    def batches() -> Iterable[list[Record]]:
        return read_records(records, history=history)

    started = time.perf_counter()
    with progress_bar(f"exporting ({fmt.value})", disable=quiet) as (progress, task):
        report = run_reporting_errors(
            lambda: export(
                batches,
                fmt,
                out,
                ObjectReader(settings),
                options,
                advance=lambda n: progress.advance(task, n),
                # hf reads the records twice: the first pass counts up, then the bar starts again
                total=lambda n: progress.update(task, completed=0, total=n),
            )
        )
    _summary(report, out, time.perf_counter() - started)


def _summary(report: ExportReport, out: Path, elapsed: float) -> None:
    rate = f"{report.exported / elapsed:,.1f}" if elapsed > 0 else "–"
    console.print(
        f"[bold]{report.exported:,}[/] of {report.read:,} records exported in {report.shards:,} shards "
        f"→ {escape(str(out))} ({elapsed:,.1f} s, {rate} records/s)",
        highlight=False,
        soft_wrap=True,
    )
    if report.filtered:
        console.print(f"{report.filtered:,} left out by --where/--only-ok", highlight=False, soft_wrap=True)
    _skipped("image gone since annotation, skipped", report.missing)
    _skipped("image replaced since annotation (another etag), skipped: annotate again", report.changed)
    _skipped("image unreadable, skipped", report.unreadable)


def _skipped(what: str, skipped: Skipped) -> None:
    if skipped.count:
        more = " …" if skipped.count > len(skipped.shown) else ""
        shown = escape(", ".join(skipped.shown))
        console.print(f"[yellow]{skipped.count:,} {what}:[/] {shown}{more}", highlight=False, soft_wrap=True)
