"""`imagemill retag RECORDS --vocabulary new.txt`: new tags from stored embeddings, no image read.

Wires the arguments, the progress bar and the summary; the work is `pipeline.retag`.
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from imagemill.cli.display import console, progress_bar, run_reporting_errors
from imagemill.core.errors import ModelLoadError, UserError
from imagemill.core.redaction import redact_url
from imagemill.core.settings import Settings, get_settings
from imagemill.core.stores.base import RecordWriter

if TYPE_CHECKING:  # torch and transformers take seconds to import: `--help` must not wait
    from imagemill.pipeline.retag import RetagCounts, Retagger

# records per batch: pydantic records are built one by one, Arrow batches are scored in one product
RECORD_BATCH = 4096
COLUMN_BATCH = 65_536
Advance = Callable[[int], None]  # the progress bar moved on by this many records read


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
    overrides = {
        "tags_vocabulary": vocabulary,
        "tags_prompt": prompt,
        "tags_top_k": top_k,
        "tags_threshold": threshold,
        "device": device,
    }
    settings = get_settings().model_copy(update={k: v for k, v in overrides.items() if v is not None})
    run_reporting_errors(lambda: run_retag(records, settings, out, history=history, quiet=quiet))


def run_retag(records: str, settings: Settings, out: Path | None, *, history: bool, quiet: bool) -> "RetagCounts":
    """Read, re-tag and write; the summary is printed and the counts returned."""
    # the arguments are checked before torch is imported (seconds): a typo is answered at once
    words = vocabulary_words(settings)
    target = _target(records, out, history)

    from imagemill.core.stores.reading import count_records
    from imagemill.pipeline.models.device import resolve_device
    from imagemill.pipeline.models.zero_shot import TagOptions
    from imagemill.pipeline.retag import Retagger

    # top_k as the tags runner counts it: at most the vocabulary (the signature holds it)
    options = TagOptions(words, settings.tags_prompt, min(settings.tags_top_k, len(words)), settings.tags_threshold)
    try:
        torch_device = resolve_device(settings.device)
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"IMAGEMILL_DEVICE={settings.device!r}: {exc}") from None
    retagger = Retagger(settings, options, torch_device)
    columnar = _is_parquet(records) and _is_parquet(target)
    total = count_records(records)
    started = time.perf_counter()
    with progress_bar("retagging", disable=quiet) as (progress, bar):
        progress.update(bar, total=total)
        if columnar:
            _columnar(records, target, retagger, lambda n: progress.advance(bar, n))
        else:
            _by_record(records, target, history, retagger, lambda n: progress.advance(bar, n))
    elapsed = time.perf_counter() - started
    console.print(_summary(records, target, retagger, elapsed, columnar))
    return retagger.counts


def vocabulary_words(settings: Settings) -> tuple[str, ...]:
    """The new vocabulary's tags; UserError for a vocabulary that cannot be read or is empty, or a
    prompt with no place for the tag."""
    try:
        words = settings.vocabulary
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--vocabulary {settings.tags_vocabulary}: cannot read it ({exc})") from None
    if not words:
        raise UserError(f"--vocabulary {settings.tags_vocabulary}: holds no tags")
    if "{}" not in settings.tags_prompt:
        raise UserError(f"--prompt {settings.tags_prompt!r}: must hold {{}} where the tag goes")
    return tuple(words)


def _target(records: str, out: Path | None, history: bool) -> str:
    if out is not None:
        return str(out)
    if records.startswith(("postgresql://", "postgres://")):
        if history:
            # a new row is current until a listing says otherwise: rows of replaced or deleted objects
            # written back would come back into imagemill_current
            raise UserError("--history with a postgresql:// store needs --out: its table takes current records only")
        return records
    raise UserError(
        f"--out is needed: retag adds rows only to a postgresql:// store, and {redact_url(records)} is not one"
    )


def _is_parquet(name: str) -> bool:
    return "://" not in name and name.lower().endswith(".parquet")


def _columnar(records: str, target: str, retagger: "Retagger", advance: Advance) -> None:
    from imagemill.core.stores import open_file_writer
    from imagemill.core.stores.files import ParquetWriter
    from imagemill.core.stores.reading import parquet_batches
    from imagemill.pipeline.retag import retag_columnar

    batches = parquet_batches(records, COLUMN_BATCH)  # checked before the output is begun
    writer = open_file_writer(target)
    assert isinstance(writer, ParquetWriter)  # the target's name ends in .parquet
    with _aborting(writer, target):
        retag_columnar(batches, writer.write_table, retagger, advance)
        _require_some(retagger, records)
    writer.close()


def _by_record(records: str, target: str, history: bool, retagger: "Retagger", advance: Advance) -> None:
    from imagemill.core.stores import open_writer
    from imagemill.core.stores.reading import read_records

    batches = read_records(records, history=history, batch_size=RECORD_BATCH)
    writer = open_writer(target)
    writer.check()
    with _aborting(writer, target):
        for number, batch in enumerate(batches):
            retagged = retagger.records(batch)
            if retagged:
                writer.write(retagged, f"retag/{number:06d}")
            advance(len(batch))
        _require_some(retagger, records)
    writer.close()


def _require_some(retagger: "Retagger", records: str) -> None:
    if not retagger.counts.retagged:
        seen = retagger.counts.without_embedding
        raise UserError(
            f"no record of {redact_url(records)} has an embedding ({seen:,} read): annotate with --tasks tags,embedding"
        )


@contextmanager
def _aborting(writer: RecordWriter, target: str) -> Iterator[None]:
    """A failure inside aborts the writer, so an earlier --out file stays as it was: a fault the user
    can fix leaves nothing behind, an interruption says where the partial output is. The caller
    closes the writer on success."""
    try:
        yield
    except UserError:
        partial = writer.abort()
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise
    except BaseException:
        partial = writer.abort()
        if partial is not None:
            console.print(f"interrupted: {target} left as it was; partial output in {partial}", highlight=False)
        raise


def _summary(records: str, target: str, retagger: "Retagger", elapsed: float, columnar: bool) -> Table:
    counts = retagger.counts
    table = Table(title=f"{redact_url(records)} → {redact_url(target)}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("retagged", f"{counts.retagged:,}")
    table.add_row("without an embedding", f"{counts.without_embedding:,}")
    for uri in counts.examples:
        table.add_row("", uri)
    if counts.without_embedding > len(counts.examples):
        table.add_row("", f"… and {counts.without_embedding - len(counts.examples):,} more")
    read = counts.retagged + counts.without_embedding
    table.add_row("elapsed", f"{elapsed:,.1f} s")
    table.add_row("records/s", f"{read / elapsed:,.0f}" if elapsed > 0 else "–")
    if retagger.model:
        name, revision = retagger.model
        table.add_row("model", f"{name} (text tower only)" + (f" @ {revision}" if revision else ""))
    table.add_row("vocabulary", f"{len(retagger.options.vocabulary):,} tags")
    for old, new in list(counts.signatures.items())[:3]:
        table.add_row("signature", f"{old} → {new}")
    if len(counts.signatures) > 3:
        table.add_row("", f"… {len(counts.signatures) - 3} more signatures")
    table.add_row("path", "columnar (Arrow)" if columnar else "records")
    return table
