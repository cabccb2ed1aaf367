"""`imagemill export RECORDS --format hf|webdataset --out DIR`: records and their images for training.

The writing is `records.exports`; this module wires the arguments, the progress bar and the summary.
"""

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from imagemill.cli.display import console, fail, progress_bar, run_reporting_errors
from imagemill.records.choices import ExportFormat

if TYPE_CHECKING:  # pyarrow, boto3 and the record readers: imported when an export runs
    from imagemill.records.exports import ExportReport, Skipped

# a URL other than s3:// is refused: export there is not something imagemill does
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
    out: Annotated[str, typer.Option(help="A new (or empty) directory for the export, or a new s3://bucket/prefix/.")],
    shard_size: Annotated[
        int | None,
        typer.Option(min=1, help="Samples per shard [webdataset: 10,000; hf: datasets' 500 MB shards]."),
    ] = None,
    only_ok: Annotated[bool, typer.Option("--only-ok", help="Leave out error records.")] = False,
    max_side: Annotated[
        int | None, typer.Option(min=1, help="Shrink images to at most this many pixels on the longer side.")
    ] = None,
    image_format: Annotated[
        str | None,
        typer.Option(help="Re-encode images: jpeg, webp or png (EXIF orientation applied, colours in sRGB)."),
    ] = None,
    quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG/WebP quality when re-encoding.")] = 90,
    where: Annotated[
        list[str] | None,
        typer.Option(
            help="An expression, repeatable, all must hold: 'moderation.nsfw < 0.2 and not duplicate', "
            "'tag = dog or tags.cat >= 0.3', 'error = none', 'processed_at >= 2026-01-01' (see the README)."
        ),
    ] = None,
    duplicates: Annotated[
        Path | None,
        typer.Option(
            help="imagemill dedup's groups file for --where duplicate / representative "
            "[default: each record's own mark, written by imagemill dedup --write-back]."
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(help="Splits by a hash of the uri, stable across exports: train=0.98,val=0.02 (one folder each)."),
    ] = None,
    history: Annotated[
        bool, typer.Option("--history", help="Every record kept, not only the current one per image.")
    ] = False,
    column_layout: Annotated[
        str,
        typer.Option(
            "--layout",
            help="hf columns: v2 (the Python API's: tags [str], tag_scores, moderation_scores [{label, score}],"
            " error_kind); v1 (the earlier export: tags [{tag, score}], scores {label: float}, error), deprecated.",
        ),
    ] = "v2",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Export RECORDS with their images' original bytes as a Hugging Face dataset or WebDataset shards."""
    if URL.match(out) and not out.startswith("s3://"):
        fail(f"--out {out}: a local directory or an s3://bucket/prefix/, not another URL")
    # pydantic-settings, pyarrow, boto3 and the record readers: loaded when an export runs, not for `--help`
    from imagemill.core import layout
    from imagemill.core.settings import get_settings
    from imagemill.records.exports import IMAGE_FORMATS, Encoding, Options, export_records, parse_split
    from imagemill.records.filters import parse_where, read_roles

    if column_layout not in (layout.LAYOUT, layout.LEGACY):
        fail(f"--layout {column_layout}: expected {layout.LAYOUT} or {layout.LEGACY}")
    if column_layout == layout.LEGACY:
        console.print(
            f"[yellow]warning: --layout {layout.LEGACY} is deprecated and goes in the next release: the default"
            f" {layout.LAYOUT} has the Python API's columns (see the README's Dataset columns)[/]",
            highlight=False,
            soft_wrap=True,
        )
    roles = run_reporting_errors(lambda: read_roles(duplicates)) if duplicates is not None else None
    conditions = run_reporting_errors(lambda: parse_where(where or [], roles))
    parts = run_reporting_errors(lambda: parse_split(split)) if split is not None else ()
    if image_format is not None and image_format.lower() not in IMAGE_FORMATS:
        fail(f"--image-format {image_format}: expected jpeg, webp or png")
    encoding = None
    if max_side is not None or image_format is not None:
        encoding = Encoding(max_side, image_format.lower() if image_format else None, quality)
    settings = get_settings()
    options = Options(
        where=conditions,
        only_ok=only_ok,
        shard_size=shard_size,
        threads=settings.fetch_threads,
        split=parts,
        encoding=encoding,
        layout=column_layout,
    )

    started = time.perf_counter()
    with progress_bar(f"exporting ({fmt.value})", disable=quiet) as (progress, task):
        report = run_reporting_errors(
            lambda: export_records(
                records,
                fmt,
                out,
                settings,
                options,
                history=history,
                advance=lambda n: progress.advance(task, n),
                # hf reads the records twice: the first pass counts up, then the bar starts again
                total=lambda n: progress.update(task, completed=0, total=n),
            )
        )
    _summary(report, out, time.perf_counter() - started)


def _summary(report: "ExportReport", out: str, elapsed: float) -> None:
    rate = f"{report.exported / elapsed:,.1f}" if elapsed > 0 else "–"
    console.print(
        f"[bold]{report.exported:,}[/] of {report.read:,} records exported in {report.shards:,} shards "
        f"→ {escape(str(out))} ({elapsed:,.1f} s, {rate} records/s)",
        highlight=False,
        soft_wrap=True,
    )
    if report.filtered:
        console.print(f"{report.filtered:,} left out by --where/--only-ok", highlight=False, soft_wrap=True)
    for name, count in report.splits.items():
        console.print(
            f"split {escape(name)}: {count:,} records → {escape(out.rstrip('/') + '/' + name)}", highlight=False
        )
    if report.repeated.count:
        console.print(
            f"[yellow]warning: {report.repeated.count:,} records of images exported already (--history keeps every"
            " record of an image), each under a key of its own:[/] "
            + escape(", ".join(report.repeated.shown))
            + (" …" if report.repeated.count > len(report.repeated.shown) else ""),
            highlight=False,
            soft_wrap=True,
        )
    if report.unmarked:
        console.print(
            f"[yellow]warning: {report.unmarked:,} records carry no dedup mark (run imagemill dedup --write-back, or"
            " give --duplicates groups.jsonl): --where counts them as neither duplicate nor representative[/]",
            highlight=False,
            soft_wrap=True,
        )
    _skipped("image gone since annotation, skipped", report.missing)
    _skipped("image replaced since annotation (another etag), skipped: annotate again", report.changed)
    _skipped("image unreadable, skipped", report.unreadable)


def _skipped(what: str, skipped: "Skipped") -> None:
    if skipped.count:
        more = " …" if skipped.count > len(skipped.shown) else ""
        shown = escape(", ".join(skipped.shown))
        console.print(f"[yellow]{skipped.count:,} {what}:[/] {shown}{more}", highlight=False, soft_wrap=True)
