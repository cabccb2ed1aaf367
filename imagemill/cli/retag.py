"""`imagemill retag RECORDS --vocabulary new.txt`: new tags from stored embeddings, no image read.

Wires the arguments, the progress bar and the summary; the work is `records.retag`.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from imagemill.cli.display import console, progress_bar, run_reporting_errors
from imagemill.core.redaction import redact_url

if TYPE_CHECKING:  # pydantic-settings, pyarrow, torch: imported when a retag runs (`--help` must not wait)
    from imagemill.core.settings import Settings
    from imagemill.records.retag import Retagged


def retag(
    records: Annotated[
        str,
        typer.Argument(
            help="Records with embeddings: a .jsonl/.parquet file, postgresql://… (its current records), "
            "or an object sink's s3://bucket/prefix/ or file:///dir/.",
            show_default=False,
        ),
    ],
    vocabulary: Annotated[
        Path, typer.Option(help="The new tags: a text file, one tag per line (# comments).", show_default=False)
    ],
    prompt: Annotated[str | None, typer.Option(help="Prompt with {} for the tag [IMAGEMILL_TAGS_PROMPT].")] = None,
    top_k: Annotated[
        int | None, typer.Option(min=1, max=100, help="Tags kept per image [IMAGEMILL_TAGS_TOP_K].")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Lowest score kept [IMAGEMILL_TAGS_THRESHOLD].")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="A .jsonl or .parquet file for the re-tagged records; a postgresql:// RECORDS gets new rows."
        ),
    ] = None,
    history: Annotated[
        bool, typer.Option("--history", help="Every stored record, not only the current ones (PostgreSQL, sinks).")
    ] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N [IMAGEMILL_DEVICE].")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """New tags for every record that has an embedding, from the embedding alone: no image is read
    and only the text tower of the model that made the embeddings is loaded."""
    from imagemill.core.settings import get_settings  # pydantic-settings: when the command runs, not for `--help`

    overrides = {
        "tags_vocabulary": vocabulary,
        "tags_prompt": prompt,
        "tags_top_k": top_k,
        "tags_threshold": threshold,
        "device": device,
    }
    settings = get_settings().model_copy(update={k: v for k, v in overrides.items() if v is not None})
    run_reporting_errors(lambda: _retag(records, settings, out, history=history, quiet=quiet))


def _retag(records: str, settings: "Settings", out: Path | None, *, history: bool, quiet: bool) -> None:
    # pyarrow and the sinks (torch once the arguments are checked): loaded when a retag runs, not for `--help`
    from imagemill.records.retag import Retag

    def interrupted(target: str, partial: Path) -> None:
        console.print(f"interrupted: {target} left as it was; partial output in {partial}", highlight=False)

    ready = Retag(records, settings, out, history=history)
    with progress_bar("retagging", disable=quiet) as (progress, bar):
        progress.update(bar, total=ready.total)
        done = ready.run(lambda n: progress.advance(bar, n), interrupted)
    console.print(_summary(records, done))


def _summary(records: str, done: "Retagged") -> Table:
    from imagemill.records.retag import PATHS  # loaded by `_retag` already

    counts = done.counts
    table = Table(title=f"{redact_url(records)} → {redact_url(done.target)}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("retagged", f"{counts.retagged:,}")
    table.add_row("without an embedding", f"{counts.without_embedding:,}")
    for uri in counts.examples:
        table.add_row("", uri)
    if counts.without_embedding > len(counts.examples):
        table.add_row("", f"… and {counts.without_embedding - len(counts.examples):,} more")
    read = counts.retagged + counts.without_embedding
    table.add_row("elapsed", f"{done.seconds:,.1f} s")
    table.add_row("records/s", f"{read / done.seconds:,.0f}" if done.seconds > 0 else "–")
    if done.model:
        name, revision = done.model
        table.add_row("model", f"{name} (text tower only)" + (f" @ {revision}" if revision else ""))
    table.add_row("vocabulary", f"{done.vocabulary:,} tags")
    if counts.own_signature:
        # their other tasks' options are unknown (older records): a run annotates them again
        table.add_row("retag's own signature", f"{counts.own_signature:,} (a run annotates them again)")
    for old, new in list(counts.signatures.items())[:3]:
        table.add_row("signature", f"{old} → {new}")
    if len(counts.signatures) > 3:
        table.add_row("", f"… {len(counts.signatures) - 3} more signatures")
    table.add_row("path", PATHS[done.path] + (f", {done.processes} processes" if done.processes > 1 else ""))
    return table
