"""Local mode's run: list the source, skip what the output already holds, annotate here or in one
engine process per GPU, and write the output: a file, which replaces the earlier one only when the
run completes, or a PostgreSQL store, whose rows are committed as they are written.

No Redis; `imagemill annotate` shows its progress and summary around this.
"""

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagemill.core.accounting import Figures, cost
from imagemill.core.gpus import Slot
from imagemill.core.pipeline_key import pipeline_key
from imagemill.core.rates import record_in_file, sample_now
from imagemill.core.schemas import ImageRef, Record
from imagemill.core.settings import Settings
from imagemill.core.sinks import KeyedSink, Sink, open_file_sink, open_sink
from imagemill.core.tasks import Task
from imagemill.local.pool import LocalPool
from imagemill.pipeline.run import run
from imagemill.pipeline.sources import Source, open_source
from imagemill.pipeline.sources.manifests import check as check_manifest

if TYPE_CHECKING:  # torch and transformers: the engine is imported when it loads (see `LocalRun.load`)
    from imagemill.pipeline.engine import Engine

log = logging.getLogger(__name__)

WRITE_EVERY = 64  # records per write: small enough to lose little on a crash
DATABASES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class LocalResult:
    """What a local run did: images by outcome (`annotated`, `skipped` or an error kind), the
    seconds from the first listed image to the closed file, and the records' pipeline signature;
    the engine's accounting (for several engine processes their figures summed: process seconds)
    and the run's cost (IMAGEMILL_COST_PER_HOUR per engine process)."""

    outcomes: Counter[str]
    seconds: float
    signature: str
    figures: Figures | None = None
    cost: float | None = None


class LocalRun:
    """One local run, in its three steps: made (the source opened and, with `strict`, a manifest
    read through to its first bad line, before any model loads), `load` (the models, here or one
    engine process per slot of `slots`), `run` (annotate and write OUT: a .jsonl or .parquet file,
    or postgresql://…, the store distributed workers write).

    Unless `force`, images OUT already holds an error-free record for (same etag and signature)
    are skipped and their records kept. Without `strict`, each bad manifest line is one
    `bad_reference` record."""

    def __init__(
        self,
        source_spec: str,
        tasks: tuple[Task, ...],
        out: Path | str,
        settings: Settings,
        *,
        force: bool = False,
        strict: bool = False,
        slots: list[Slot] | None = None,
    ) -> None:
        self.source: Source = open_source(source_spec, settings)
        if strict:
            check_manifest(self.source)
        self.tasks = tasks
        self.out = str(out)
        if self.out.startswith(DATABASES):
            open_sink(self.out).close()  # a bad URL is answered now, before any model loads
        self.settings = settings
        self.force = force
        self.slots = slots
        self.engine: Engine | LocalPool | None = None

    def load(self) -> None:
        """Load the models: in this process (no `slots`), or one engine process per slot."""
        if self.slots is not None:
            self.engine = LocalPool(self.settings, self.tasks, self.slots)
            return
        # torch and transformers (the engine's model runners) take seconds to import: `--help` must not
        # wait, nor a source that fails first, nor a parent whose children run the models
        from imagemill.pipeline.engine import Engine

        self.engine = Engine(self.settings, self.tasks)

    def run(
        self,
        on_skipped: Callable[[list[ImageRef]], None] | None = None,
        on_record: Callable[[Record], None] | None = None,
        interrupted: Callable[[Path | None], None] = lambda partial: None,
    ) -> LocalResult:
        """Annotate and write (the models are loaded first if `load` was not called). `on_skipped`
        hears of each batch of skipped refs, `on_record` of each record before it is written; on any
        failure or interruption an earlier OUT file stays as it was and `interrupted` hears where
        this run's records are (None for a database: the rows written so far are committed, and the
        next run skips them)."""
        if self.engine is None:
            self.load()
        engine = self.engine
        assert engine is not None
        sink = self._sink()
        # several engine processes account in the children, and send their figures when they end
        accounting = None if isinstance(engine, LocalPool) else engine.accounting
        before = accounting.figures() if accounting is not None else None
        started = time.perf_counter()
        try:
            with engine:
                result = run(
                    self.source.refs(),
                    engine,
                    sink,
                    write_every=WRITE_EVERY,
                    skip=None if self.force or not isinstance(sink, KeyedSink) else sink,
                    on_skipped=on_skipped,
                    on_record=on_record,
                    accounting=accounting,
                )
        except BaseException:
            # an interrupted run must not replace a complete earlier output with a partial one
            interrupted(sink.abort())
            raise
        sink.close()
        seconds = time.perf_counter() - started
        if isinstance(engine, LocalPool):
            figures: Figures | None = engine.figures if engine.figures.images else None
        else:
            figures = accounting.figures() - before if accounting is not None and before is not None else None
        processes = len(self.slots) if self.slots else 1
        self._record_rate(result.outcomes, seconds, processes, engine.signature)
        spent = cost(seconds, self.settings.cost_per_hour, processes)
        return LocalResult(result.outcomes, seconds, engine.signature, figures, spent)

    def _record_rate(self, outcomes: Counter[str], seconds: float, processes: int, signature: str) -> None:
        """One sample for `imagemill estimate`: the images annotated here over the process seconds."""
        images = sum(n for kind, n in outcomes.items() if kind != "skipped")
        if not images:
            return
        key = pipeline_key(self.tasks, self.settings)
        sample = sample_now(key, images, seconds * processes, "local", signature, None)
        try:
            record_in_file(self.settings.rates_file, sample)
        except OSError as exc:  # a read-only home costs the estimates a sample, never the run
            log.warning("rate sample not recorded in %s: %s", self.settings.rates_file, exc)

    def _sink(self) -> Sink:
        if self.out.startswith(DATABASES):
            sink = open_sink(self.out)
            sink.check()  # connects and makes the table
            return sink
        return open_file_sink(self.out, keep_existing=not self.force, embedding_dtype=self.settings.embedding_dtype)


def annotate_local(
    source_spec: str,
    tasks: tuple[Task, ...],
    out: Path | str,
    settings: Settings,
    *,
    force: bool = False,
    strict: bool = False,
    slots: list[Slot] | None = None,
) -> Counter[str]:
    """A whole local run in one call, with nothing shown; its outcome counts."""
    return LocalRun(source_spec, tasks, out, settings, force=force, strict=strict, slots=slots).run().outcomes
