"""`imagemill dedup RECORDS`: near-duplicate groups from the records' stored embeddings; with
`--against CORPUS`, which of RECORDS duplicate CORPUS's images.

No image is read: the records' embeddings are compared (`records.near_duplicates`) and the groups
written as JSON Lines, one group a line, beside a summary of what was passed over.
"""

import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from imagemill.cli.display import console, fail, progress_bar, run_reporting_errors
from imagemill.records.choices import DEFAULT_BLOCK

if TYPE_CHECKING:  # numpy: imported when a dedup runs
    from imagemill.records.dedup_marks import Marks
    from imagemill.records.near_duplicates import DuplicateGroup, Embeddings, NewDuplicate, Plan

DEDUP_EXTRA = "pip install 'imagemill[dedup]'"
METHOD_HELP = (
    "auto: exact on a GPU (torch) or up to 50,000 embeddings, faiss IVF above; exact: every pair (quadratic); "
    "approximate: faiss IVF (nearest neighbours, checked exactly; the dedup extra)."
)


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
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = "auto",
    against: Annotated[
        str | None,
        typer.Option(
            help="A corpus (RECORDS' forms): write which of RECORDS duplicate its images, one line each, "
            "without grouping the corpus.",
            show_default=False,
        ),
    ] = None,
    write_back: Annotated[
        bool,
        typer.Option(
            "--write-back",
            help="Also mark each compared record (RECORDS: a .jsonl/.parquet file, rewritten, or postgresql://, "
            "updated) with its group and whether it is the one kept: export --where 'not duplicate' reads it.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Group RECORDS' images whose embeddings are alike, each group with its largest image first."""
    from imagemill.core.settings import get_settings  # pydantic-settings: when the command runs, not for `--help`

    # every IMAGEMILL_* value is checked up front, as in every command (the S3 and file readers use them)
    get_settings()
    if not 0 < threshold <= 1:
        fail(f"--threshold must be above 0 and at most 1, not {threshold}")
    if importlib.util.find_spec("scipy") is None:  # the dedup extra: checked before minutes of reading
        fail(f"dedup needs the dedup extra, which is not installed (no module 'scipy'): {DEDUP_EXTRA}")
    if method not in ("auto", "exact", "approximate"):
        fail(f"--method {method}: expected auto, exact or approximate")
    if write_back:
        from imagemill.records.dedup_marks import check_writable  # the record readers: when the command runs

        run_reporting_errors(lambda: check_writable(records))
    started = time.perf_counter()
    if against is not None:
        corpus = against
        embeddings, matched, plan = run_reporting_errors(
            lambda: _against(corpus, records, threshold, out, history, block_size, method, quiet)
        )
        _against_summary(embeddings, matched, plan, out, time.perf_counter() - started)
        if write_back:
            from imagemill.records.dedup_marks import against_marks  # loaded with the grouping above

            _write_back(records, against_marks(embeddings, matched), threshold)
        return
    embeddings, groups, plan = run_reporting_errors(
        lambda: _group(records, threshold, out, history, block_size, method, quiet)
    )
    _summary(embeddings, groups, plan, out, time.perf_counter() - started)
    if write_back:
        from imagemill.records.dedup_marks import group_marks  # loaded with the grouping above

        _write_back(records, group_marks(embeddings, groups), threshold)


def _write_back(records: str, marks: "Marks", threshold: float) -> None:
    from imagemill.core.redaction import redact_url  # with the record writers, loaded when a dedup runs
    from imagemill.records.dedup_marks import write_back

    started = time.perf_counter()
    marked = run_reporting_errors(lambda: write_back(records, marks, threshold))
    console.print(
        f"{marked:,} records marked with their group and role → {escape(redact_url(records))}"
        f" ({time.perf_counter() - started:,.1f} s)",
        highlight=False,
        soft_wrap=True,
    )


def _group(
    source: str, threshold: float, out: Path, history: bool, block: int, method: str, quiet: bool
) -> tuple["Embeddings", list["DuplicateGroup"], "Plan"]:
    # numpy and pyarrow (the grouping, the record readers): loaded when a dedup runs, not for `--help`
    from imagemill.records.near_duplicates import group, plan_for, read_embeddings, write_groups

    with progress_bar("reading records", disable=quiet, unit="records") as (progress, task):
        embeddings = read_embeddings(source, history=history, advance=lambda n: progress.advance(task, n))
        n = len(embeddings.images)
        plan = plan_for(method, n)
        if plan.method == "ivf":
            progress.update(task, description="searching neighbours", completed=0, total=n)
        else:
            progress.update(task, description="comparing pairs", completed=0, total=n * (n + 1) // 2)
        groups = group(embeddings, threshold, block, lambda pairs: progress.advance(task, pairs), plan)
    write_groups(groups, out)
    return embeddings, groups, plan


def _against(
    corpus: str, source: str, threshold: float, out: Path, history: bool, block: int, method: str, quiet: bool
) -> tuple["Embeddings", list["NewDuplicate"], "Plan"]:
    # numpy and pyarrow: loaded when a dedup runs, not for `--help`
    from imagemill.records.near_duplicates import against, plan_for, read_embeddings, write_lines

    with progress_bar("reading the corpus", disable=quiet, unit="records") as (progress, task):
        known = read_embeddings(corpus, history=history, advance=lambda n: progress.advance(task, n))
        progress.update(task, description="reading the new records", completed=0, total=None)
        new = read_embeddings(source, history=history, advance=lambda n: progress.advance(task, n))
        plan = plan_for(method, len(known.images))
        progress.update(task, description="searching the corpus", completed=0, total=None)
        matched = against(known, new, threshold, plan, block, lambda n: progress.advance(task, n))
    write_lines(matched, out)
    return new, matched, plan


def _against_summary(new: "Embeddings", matched: list["NewDuplicate"], plan: "Plan", out: Path, elapsed: float) -> None:
    console.print(
        f"[bold]{len(matched):,}[/] of {len(new.images):,} new images duplicate the corpus's"
        f" ({plan.describe()}, {elapsed:,.1f} s) → {escape(str(out))}",
        highlight=False,
        soft_wrap=True,
    )


def _summary(embeddings: "Embeddings", groups: list["DuplicateGroup"], plan: "Plan", out: Path, elapsed: float) -> None:
    n = len(embeddings.images)
    grouped = sum(g.size for g in groups)
    console.print(
        f"[bold]{n:,}[/] embeddings compared ({embeddings.model or 'none'}; {plan.describe()}) in {elapsed:,.1f} s: "
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
