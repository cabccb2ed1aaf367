"""One retag from RECORDS to its target: the vocabulary checked, the target chosen, the fastest path
for the pair taken (columnar for Parquet to Parquet, JSON objects for JSONL or PostgreSQL to JSONL,
split over processes for a large input (`records.split`), keys and vectors for a PostgreSQL store
retagged in place, records otherwise), and the target aborted when the run fails.

The scoring itself is `records.retagger`; the command line shows the progress and the summary.
"""

import functools
import gc
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from imagemill.core.errors import ModelLoadError, UserError
from imagemill.core.redaction import redact_url
from imagemill.core.settings import Settings
from imagemill.core.sinks import open_file_sink, open_sink, read_records
from imagemill.core.sinks.base import Sink, StoredEmbeddings, first_error
from imagemill.core.sinks.files import (
    JsonlSink,
    ParquetSink,
    count_records,
    json_rows,
    line_ranges,
    parquet_batches,
    record_file_kind,
)

if TYPE_CHECKING:  # torch and transformers: imported once the arguments are checked (see `Retag`)
    from imagemill.core.schemas import Record
    from imagemill.records.retagger import RetagCounts, Retagger

# records per batch: pydantic records are built one by one, Arrow batches are scored in one product
RECORD_BATCH = 4096
COLUMN_BATCH = 65_536
# rows read to load the text tower before a split's processes are forked (the first with an embedding)
FIRST_ROWS = 64
# connections writing a store retagged in place, each with a batch in flight: the database's copy
# of the rows waits on I/O as much as on CPU, and two overlap (1.4-1.6x the rows a second, measured)
KEYED_WRITERS = 2
# the cyclic collector's thresholds during a run (`_young_collections_spaced`): a young pass per
# 100,000 objects, older passes as rarely as the young ones
RUN_GC_THRESHOLDS = (100_000, 50, 100)
Advance = Callable[[int], None]  # this many more records were read
Interrupted = Callable[[str, Path], None]  # the target left as it was, and where the partial output is
T = TypeVar("T")


@dataclass(frozen=True)
class Retagged:
    """What a retag did, for its summary: the counts, where the records went, the model whose text
    tower scored them, the vocabulary's size, the path it took (`PATHS`), the seconds it took, and
    the processes it was split over (`records.split`; 1 but for a large input on the JSON path)."""

    counts: "RetagCounts"
    target: str
    model: tuple[str, str | None] | None
    vocabulary: int
    path: str
    seconds: float
    processes: int = 1

    @property
    def columnar(self) -> bool:
        """Whether no record object was built for each record (every path but `records`)."""
        return self.path != "records"


# how each path reads and writes, for the summary
PATHS = {
    "columnar": "columnar (Arrow)",
    "json": "JSON objects (no record objects)",
    "keyed": "keys and vectors (rows copied in the database)",
    "records": "records",
}


class Retag:
    """A retag made ready: the arguments checked and the retagger built (no model loaded yet, no
    record read); `run` does the work."""

    def __init__(self, records: str, settings: Settings, out: Path | None, *, history: bool) -> None:
        # the arguments are checked before any model loads (seconds): a typo is answered at once
        words = vocabulary_words(settings)
        self.records = records
        self.history = history
        self.target = _target(records, out, history)
        # torch and transformers take seconds to import: only once the arguments are known good
        from imagemill.pipeline.models.device import resolve_device
        from imagemill.pipeline.models.zero_shot import TagOptions
        from imagemill.records.retagger import Retagger

        # top_k as the tags runner counts it: at most the vocabulary (the signature holds it)
        options = TagOptions(words, settings.tags_prompt, min(settings.tags_top_k, len(words)), settings.tags_threshold)
        try:
            torch_device = resolve_device(settings.device)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"IMAGEMILL_DEVICE={settings.device!r}: {exc}") from None
        self.retagger = Retagger(settings, options, torch_device)
        # the JSON path's processes for a large input (`records.split`): one on a GPU, whose one
        # device the parts would share
        self.processes = settings.retag_processes if torch_device.type == "cpu" else 1
        self.path = _path(records, self.target)
        # how many records there are, when that is known without reading them (a Parquet file's metadata)
        self.total = count_records(records)

    def run(
        self, advance: Advance = lambda n: None, interrupted: Interrupted = lambda target, partial: None
    ) -> Retagged:
        """Read, re-tag and write. `advance` hears of each batch read; `interrupted` of a target left
        as it was and where the partial output is, when anything but a fault the user can fix stops it."""
        started = time.perf_counter()
        processes = 1
        with _long_lived_frozen(), _young_collections_spaced():
            if self.path == "columnar":
                _columnar(self.records, self.target, self.retagger, advance, interrupted)
            elif self.path == "json":
                processes = _json(
                    self.records, self.target, self.history, self.retagger, advance, interrupted, self.processes
                )
            elif self.path == "keyed":
                _keyed(self.records, self.history, self.retagger, advance)
            else:
                _by_record(self.records, self.target, self.history, self.retagger, advance, interrupted)
        seconds = time.perf_counter() - started
        retagger = self.retagger
        vocabulary = len(retagger.options.vocabulary)
        return Retagged(retagger.counts, self.target, retagger.model, vocabulary, self.path, seconds, processes)


def retag(records: str, settings: Settings, out: Path | None, *, history: bool) -> Retagged:
    """Make ready and run in one call (no progress to show)."""
    return Retag(records, settings, out, history=history).run()


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


def _path(records: str, target: str) -> str:
    """Which path a retag from `records` to `target` takes (`PATHS`)."""
    if _is_parquet(records) and _is_parquet(target):
        return "columnar"
    if _file_kind(target) == "jsonl" and (_file_kind(records) in ("jsonl", "jsonl.gz") or _is_postgres(records)):
        return "json"
    if records == target and records.startswith(("postgresql://", "postgres://")):
        return "keyed"
    return "records"


def _is_postgres(name: str) -> bool:
    return name.startswith(("postgresql://", "postgres://"))


def _file_kind(name: str) -> str | None:
    return None if "://" in name else record_file_kind(Path(name))


def _json(
    records: str,
    target: str,
    history: bool,
    retagger: "Retagger",
    advance: Advance,
    interrupted: Interrupted,
    processes: int,
) -> int:
    """The JSON path, split over up to `processes` processes for a large input; how many it took."""
    from imagemill.records.split import retag_parts  # loaded by `Retag` already: torch stays out of the import

    with ExitStack() as held:  # a PostgreSQL split's snapshot, held until its parts are read
        parts = _json_parts(records, history, retagger, processes, held)
        batches: Iterable[list[dict[str, Any]]] = ()  # of one process
        if parts is None and _is_postgres(records):
            from imagemill.core.sinks.postgres import PostgresSink  # psycopg, for this store only

            batches = PostgresSink(records).read_json(history=history, batch_size=RECORD_BATCH)
        elif parts is None:
            batches = json_rows(records, RECORD_BATCH)  # checked before the output is begun
        sink = open_file_sink(target)
        assert isinstance(sink, JsonlSink)  # the target's name ends in .jsonl
        stream = functools.partial(_json_stream, records=records)
        with _aborting(sink, target, interrupted):
            if parts is not None:
                retag_parts(parts, sink, retagger, stream, advance)
            else:
                stream(batches, sink, retagger, advance)
            _require_some(retagger, records)
        sink.close()
    return 1 if parts is None else len(parts)


def _json_stream(
    batches: Iterable[list[dict[str, Any]]], sink: JsonlSink, retagger: "Retagger", advance: Advance, *, records: str
) -> None:
    """The JSON path's batches retagged into `sink` (in this process, or in a part's)."""
    with (
        ThreadPoolExecutor(1, thread_name_prefix="retag-write") as pool,
        closing(_read_ahead(batches)) as ahead,  # a failure stops the reading before the sink is aborted
    ):
        # three stages overlapped: the next batch read and parsed, this one scored (torch, without
        # the GIL), the last one serialised and written; one write in flight, in order
        writing: Future[None] | None = None
        for batch in ahead:
            rows = _validated(retagger, batch, records)
            if writing is not None:
                writing.result()  # a failed write stops the run here
            writing = pool.submit(sink.write_rows, rows)
            advance(len(batch))
        if writing is not None:
            writing.result()


def _json_parts(
    records: str, history: bool, retagger: "Retagger", processes: int, held: ExitStack
) -> list[Callable[[], Iterable[list[dict[str, Any]]]]] | None:
    """The sources of the parts the JSON path is split into (`records.split`), the text tower loaded
    for them; None for one process: one asked for, a small input (`SPLIT_BYTES`, `SPLIT_ROWS`), a
    gzipped file, or first rows (`FIRST_ROWS`) with no embedding as imagemill writes it."""
    from imagemill.records.split import SPLIT_BYTES, SPLIT_ROWS  # with the retagger: torch stays out of the import

    if processes < 2:
        return None
    if _is_postgres(records):
        from imagemill.core.sinks.postgres import PostgresSink  # psycopg, for this store only

        store = PostgresSink(records)
        keys = held.enter_context(store.split_json(processes, history=history))
        if len(keys) < 2 or sum(part.rows for part in keys) < SPLIT_ROWS:
            return None
        if not retagger.load_for(_first(store.read_json(history=history, batch_size=FIRST_ROWS, part=keys[0]))):
            return None
        return [
            functools.partial(PostgresSink(records).read_json, history=history, batch_size=RECORD_BATCH, part=part)
            for part in keys
        ]
    if _file_kind(records) != "jsonl" or not Path(records).is_file() or Path(records).stat().st_size < SPLIT_BYTES:
        return None
    ranges = line_ranges(records, processes)
    if len(ranges) < 2:
        return None
    if not retagger.load_for(_first(json_rows(records, FIRST_ROWS, ranges[0]))):
        return None
    return [functools.partial(json_rows, records, RECORD_BATCH, lines) for lines in ranges]


def _keyed(records: str, history: bool, retagger: "Retagger", advance: Advance) -> None:
    """A PostgreSQL store retagged in place: keys and vectors read in batches (one snapshot), new
    rows made by the database from the old ones, one transaction per batch (as the records path)."""
    from imagemill.core.sinks.postgres import PostgresSink  # psycopg, for this store only
    from imagemill.records.retagger import json_time  # loaded by `Retag` already: torch stays out of the import

    reader = PostgresSink(records)
    writers = [PostgresSink(records) for _ in range(KEYED_WRITERS)]
    batches = reader.read_embeddings(history=history, batch_size=RECORD_BATCH)
    # the database copies batches' rows (its own CPU and I/O, most of the time) while the next is
    # read and scored here: a write in flight on each writer's connection, batch n on writer
    # n % KEYED_WRITERS, and a failed one stops the run at the next batch on its writer
    writing: deque[Future[None]] = deque()
    try:
        with (
            ThreadPoolExecutor(max_workers=KEYED_WRITERS, thread_name_prefix="retag-write") as pool,
            closing(_read_ahead(batches)) as ahead,
        ):
            for number, batch in enumerate(ahead):

                def whole(i: int, batch: "StoredEmbeddings" = batch) -> "Record":
                    # the reader's own connection (its cursor has one of its own): a writer's may be mid-transaction
                    return reader.stored_record(batch.uris[i], batch.etags[i], batch.signatures[i])

                rows = retagger.stored(batch, whole)
                now = datetime.now(UTC)
                if len(writing) == KEYED_WRITERS:
                    writing.popleft().result()  # this batch's writer is free again
                writer = writers[number % KEYED_WRITERS]
                writing.append(pool.submit(writer.write_retagged, rows, now, json_time(now)))
                advance(len(batch.uris))
            while writing:
                writing.popleft().result()
        _require_some(retagger, records)
    finally:
        for sink in (reader, *writers):
            sink.close()


def _first(batches: Iterator[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The first batch, the reading stopped there (its file or connection closed)."""
    try:
        return next(batches, [])
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _read_ahead(batches: Iterable[T]) -> Generator[T, None, None]:
    """The batches in order, the next one read on a thread while the caller works on this one: a
    PostgreSQL server makes the next batch (on the other core) while this one is scored and written,
    and a file's next block is read meanwhile. Its errors are raised here, at the batch they stop."""
    source = iter(batches)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retag-read")
    try:
        reading = pool.submit(next, source, None)
        while (batch := reading.result()) is not None:
            reading = pool.submit(next, source, None)
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        close = getattr(source, "close", None)
        if close is not None:  # a generator stopped early: its connection or file closed now
            close()


@contextmanager
def _long_lived_frozen() -> Iterator[None]:
    """The objects alive before the run (torch, transformers, the model: hundreds of thousands) left
    out of the cyclic collector's full passes while it runs: each batch's thousands of JSON objects
    otherwise set one off every few batches, and each walks all of them (a fifth of the JSON path's
    time). Cycles made during the run are still collected."""
    if gc.get_freeze_count():  # the caller froze them already, and thaws them itself
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def _young_collections_spaced() -> Iterator[None]:
    """The cyclic collector's young passes spaced out while the run goes (`RUN_GC_THRESHOLDS`):
    a batch makes some 40,000 objects (JSON objects, its tags' dicts), none in a cycle, and at
    Python's 700 allocations a pass each walks the batches still held again and again (a tenth of
    the JSON path's CPU, measured: 31 against 28 µs a record). Cycles are still collected."""
    before = gc.get_threshold()
    gc.set_threshold(*RUN_GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def _validated(retagger: "Retagger", batch: list[dict[str, Any]], records: str) -> list[dict[str, Any]]:
    """The batch retagged, with a row that is not a record (validated when it cannot be read as it
    is) one line."""
    try:
        return retagger.json_rows(batch)
    except ValidationError as exc:
        where = redact_url(records)
        raise UserError(f"RECORDS {where}: holds a row that is not a record ({first_error(exc)})") from None


def _columnar(records: str, target: str, retagger: "Retagger", advance: Advance, interrupted: Interrupted) -> None:
    from imagemill.records.retagger import retag_columnar  # loaded by `Retag` already: torch stays out of the import

    batches = parquet_batches(records, COLUMN_BATCH)  # checked before the output is begun
    sink = open_file_sink(target)
    assert isinstance(sink, ParquetSink)  # the target's name ends in .parquet
    with _aborting(sink, target, interrupted):
        retag_columnar(batches, sink.write_table, retagger, advance)
        _require_some(retagger, records)
    sink.close()


def _by_record(
    records: str, target: str, history: bool, retagger: "Retagger", advance: Advance, interrupted: Interrupted
) -> None:
    batches = read_records(records, history=history, batch_size=RECORD_BATCH)
    sink = open_sink(target)
    sink.check()
    with _aborting(sink, target, interrupted):
        for number, batch in enumerate(batches):
            retagged = retagger.records(batch)
            if retagged:
                sink.write(retagged, f"retag/{number:06d}")
            advance(len(batch))
        _require_some(retagger, records)
    sink.close()


def _require_some(retagger: "Retagger", records: str) -> None:
    if not retagger.counts.retagged:
        seen = retagger.counts.without_embedding
        raise UserError(
            f"no record of {redact_url(records)} has an embedding ({seen:,} read): annotate with --tasks tags,embedding"
        )


@contextmanager
def _aborting(sink: Sink, target: str, interrupted: Interrupted) -> Iterator[None]:
    """A failure inside aborts the sink, so an earlier --out file stays as it was: a fault the user
    can fix leaves nothing behind, an interruption says where the partial output is. The caller
    closes the sink on success."""
    try:
        yield
    except UserError:
        partial = sink.abort()
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise
    except BaseException:
        partial = sink.abort()
        if partial is not None:
            interrupted(target, partial)
        raise
