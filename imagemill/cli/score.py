"""`imagemill score RECORDS --head NAME=FILE.safetensors`: probes' scores from stored embeddings.

Wires the arguments, the progress bar and the summary; the work is `records.probes`.
"""

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from imagemill.cli.display import console, progress_bar, run_reporting_errors
from imagemill.core.redaction import redact_url


def score(
    records: Annotated[
        str,
        typer.Argument(help="Records with embeddings: a .jsonl/.parquet file, postgresql://…, s3://… or file:///…"),
    ],
    head: Annotated[
        list[str],
        typer.Option(
            help="NAME=FILE.safetensors, repeatable: linear layers applied in order (LAION's aesthetic "
            "predictor's shape), one score per record, kept as scores.NAME.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="A .jsonl or .parquet file for the scored records; a postgresql:// RECORDS is updated."),
    ] = None,
    history: Annotated[bool, typer.Option("--history", help="Every stored record, not only the current ones.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """A named score per record from its stored embedding: no image read, no model but the heads."""
    from imagemill.core.settings import get_settings  # pydantic-settings: when the command runs, not for `--help`
    from imagemill.records.probes import load_head, parse_head, score  # numpy and the sinks: when it runs

    get_settings()  # every IMAGEMILL_* value checked up front, as in every command
    heads = run_reporting_errors(lambda: [load_head(*parse_head(text)) for text in head])
    with progress_bar("scoring", disable=quiet) as (progress, bar):
        counts, target = run_reporting_errors(
            lambda: score(records, heads, out, history=history, advance=lambda n: progress.advance(bar, n))
        )
    names = ", ".join(h.name for h in heads)
    console.print(
        f"[bold]{counts.scored:,}[/] records scored ({escape(names)}) → {escape(redact_url(target))}",
        highlight=False,
        soft_wrap=True,
    )
    if counts.without_embedding:
        shown = escape(", ".join(counts.examples))
        console.print(
            f"{counts.without_embedding:,} records without an embedding, not scored: {shown}",
            highlight=False,
            soft_wrap=True,
        )
