"""`imagemill dedup RECORDS`: near-duplicate groups from the records' stored embeddings.

No image is read: the records' embeddings are compared (`pipeline.near_duplicates`) and the groups
written as JSON Lines, one group a line, beside a summary of what was passed over.
"""

import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from imagemill.cli.display import console, fail, progress_bar, run_reporting_errors
from imagemill.core.schemas import Record
from imagemill.pipeline.near_duplicates import DEFAULT_BLOCK, DuplicateGroup, Embeddings, collect, group

DEDUP_EXTRA = "pip install 'imagemill[dedup]'"


def dedup(
    records: Annotated[
        str,
        typer.Argument(help="Records: a .jsonl/.parquet file, postgresql://…, s3://bucket/prefix/ or file:///dir/."),
    ],
    threshold: Annotated[
        float, typer.Option(help="Cosine similarity at or above which two images are near-duplicates (0-1].")
    ] = 0.95,
    out: Annotated[Path, typer.Option(help="Where the groups go: JSON Lines, one group a line.")] = Path(
        "groups.jsonl"
    ),
    history: Annotated[
        bool, typer.Option("--history", help="Every record kept, not only the current one per image.")
    ] = False,
    block_size: Annotated[
        int, typer.Option(min=1, help="Rows per tile of the similarity matrix: memory is block² x 5 bytes.")
    ] = DEFAULT_BLOCK,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Group RECORDS' images whose embeddings are alike, each group with its largest image first."""
    if not 0 < threshold <= 1:
        fail(f"--threshold must be above 0 and at most 1, not {threshold}")
    if importlib.util.find_spec("scipy") is None:  # the dedup extra: checked before minutes of reading
        fail(f"dedup needs the dedup extra, which is not installed (no module 'scipy'): {DEDUP_EXTRA}")
    started = time.perf_counter()
    embeddings, groups = run_reporting_errors(lambda: _group(records, threshold, out, history, block_size, quiet))
    _summary(embeddings, groups, out, time.perf_counter() - started)


def _group(
    source: str, threshold: float, out: Path, history: bool, block: int, quiet: bool
) -> tuple[Embeddings, list[DuplicateGroup]]:
    # the reader module imports pyarrow: loaded when a dedup runs, not for `imagemill --help`
    from imagemill.core.stores.reading import read_records

    with progress_bar("reading records", disable=quiet, unit="records") as (progress, task):

        def counted() -> Iterator[list[Record]]:
            for batch in read_records(source, history=history):
                progress.advance(task, len(batch))
                yield batch

        embeddings = collect(counted(), one_per_image=history)
        n = len(embeddings.images)
        progress.update(task, description="comparing pairs", completed=0, total=n * (n + 1) // 2)
        groups = group(embeddings, threshold, block, lambda pairs: progress.advance(task, pairs))
    _write(groups, out)
    return embeddings, groups


def _write(groups: list[DuplicateGroup], out: Path) -> None:
    """Beside the target, then moved into place: an interrupted run leaves the earlier file."""
    partial = out.with_name(f".{out.name}.partial")
    try:
        with partial.open("w", encoding="utf-8") as handle:
            handle.writelines(g.model_dump_json() + "\n" for g in groups)
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        fail(f"cannot write {out}: {exc.strerror or exc}")


def _summary(embeddings: Embeddings, groups: list[DuplicateGroup], out: Path, elapsed: float) -> None:
    n = len(embeddings.images)
    grouped = sum(g.size for g in groups)
    console.print(
        f"[bold]{n:,}[/] embeddings compared ({embeddings.model or 'none'}) in {elapsed:,.1f} s: "
        f"[bold]{len(groups):,}[/] groups holding {grouped:,} images ({grouped - len(groups):,} beside their "
        f"representatives) → {escape(str(out))}",
        highlight=False,
        soft_wrap=True,
    )
    if embeddings.without_embedding:
        shown = escape(", ".join(embeddings.without_embedding_shown))
        more = " …" if embeddings.without_embedding > len(embeddings.without_embedding_shown) else ""
        console.print(
            f"{embeddings.without_embedding:,} records without an embedding, not compared "
            f"(annotate with --tasks embedding): {shown}{more}",
            highlight=False,
            soft_wrap=True,
        )
    if embeddings.failed:
        console.print(
            f"{embeddings.failed:,} error records (no image annotated), not compared", highlight=False, soft_wrap=True
        )
