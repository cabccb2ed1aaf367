"""The one run loop (`imagemill.pipeline.run`), as local mode and the chunk task use it: real tiny
models, real files; what it writes, when, what it counts and skips, and what the hooks hear."""

from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from imagemill.core.schemas import ImageRef, Record
from imagemill.core.settings import Settings
from imagemill.core.sinks.files import JsonlSink, read_records
from imagemill.core.tasks import Task
from imagemill.pipeline.engine import Engine
from imagemill.pipeline.hooks import Middleware
from imagemill.pipeline.run import run
from imagemill.pipeline.sources import open_source
from tests.fixtures.images import Case, photo_jpeg, write_mixed


class Heard(Middleware):
    """A middleware that remembers what the engine told it."""

    def __init__(self) -> None:
        self.loads: list[tuple[Task, float]] = []
        self.batches: list[int] = []

    def after_model_load(self, task: Task, seconds: float) -> None:
        self.loads.append((task, seconds))

    def after_batch(self, size: int) -> None:
        self.batches.append(size)


class ObservedJsonl(JsonlSink):
    """The local-mode JSONL writer, noting the size and chunk name of every write it gets."""

    def _open(self) -> None:
        super()._open()
        self.writes: list[tuple[int, str]] = []

    def write(self, records: Sequence[Record], chunk: str = "") -> None:
        self.writes.append((len(records), chunk))
        super().write(records, chunk)


@pytest.fixture(scope="module")
def heard() -> Heard:
    return Heard()


@pytest.fixture(scope="module")
def engine(tiny_models: dict[str, Path], heard: Heard) -> Iterator[Engine]:
    settings = Settings(moderation_model=str(tiny_models["moderation"]), device="cpu", batch_size=4)
    with Engine(settings, (Task.MODERATION,), middleware=[heard]) as engine:
        yield engine


@pytest.fixture
def photos(tmp_path: Path) -> tuple[Path, list[Case]]:
    folder = tmp_path / "photos"
    return folder, write_mixed(folder)


def refs_of(folder: Path) -> list[ImageRef]:
    return list(open_source(str(folder), Settings()).refs())


def test_local_mode_writes_every_n_records_and_counts_what_it_wrote(engine: Engine, photos, tmp_path: Path) -> None:
    folder, cases = photos
    refs = refs_of(folder)
    writer = ObservedJsonl(tmp_path / "out.jsonl", keep_existing=False)
    seen: list[str] = []

    result = run(refs, engine, writer, write_every=3, on_record=lambda record: seen.append(record.uri))
    writer.close()

    records = read_records(tmp_path / "out.jsonl")
    assert [r.uri for r in records] == seen == [ref.uri for ref in refs]  # one record per ref, in order
    full, rest = divmod(len(refs), 3)
    assert writer.writes == [(3, "")] * full + ([(rest, "")] if rest else [])
    assert result.outcomes == Counter(record.outcome for record in records)
    assert result.outcomes["annotated"] == sum(1 for c in cases if not c.expected_error)
    assert result.write_seconds > 0
    assert all(r.job_id is None for r in records)


def test_a_chunk_is_one_write_under_its_name_carrying_its_job(engine: Engine, photos, tmp_path: Path) -> None:
    folder, _ = photos
    refs = refs_of(folder)
    writer = ObservedJsonl(tmp_path / "chunk.jsonl", keep_existing=False)

    result = run(refs, engine, writer, chunk="job1/000007", job_id="job1")
    writer.close()

    assert writer.writes == [(len(refs), "job1/000007")]
    records = read_records(tmp_path / "chunk.jsonl")
    assert {r.job_id for r in records} == {"job1"}
    assert sum(result.outcomes.values()) == len(refs) and "skipped" not in result.outcomes


def test_skip_keeps_what_the_store_holds_and_annotates_only_the_rest(engine: Engine, photos, tmp_path: Path) -> None:
    folder, cases = photos
    out = tmp_path / "out.jsonl"
    first = JsonlSink(out, keep_existing=False)
    run(refs_of(folder), engine, first, write_every=64)
    first.close()
    (folder / "new.jpg").write_bytes(photo_jpeg(120, 90, seed=7))

    again = JsonlSink(out, keep_existing=True)
    skipped: list[ImageRef] = []
    annotated: list[str] = []
    result = run(
        refs_of(folder),
        engine,
        again,
        write_every=64,
        skip=again,
        on_skipped=skipped.extend,
        on_record=lambda record: annotated.append(record.uri),
    )
    again.close()

    good = sum(1 for c in cases if not c.expected_error)
    broken = len(cases) - good
    assert result.outcomes["skipped"] == len(skipped) == good  # error-free records are kept as they were
    assert len(annotated) == broken + 1  # the broken images are tried again, and the new photo
    assert any(uri.endswith("/new.jpg") for uri in annotated)
    records = read_records(out)
    assert len(records) == len({r.uri for r in records}) == len(cases) + 1


class Interrupted(Exception):
    """Stands for Ctrl-C (KeyboardInterrupt) in the middle of a run."""


def test_an_interrupted_run_raises_and_leaves_the_writer_to_its_owner(engine: Engine, photos, tmp_path: Path) -> None:
    folder, _ = photos
    out = tmp_path / "out.jsonl"
    out.write_text("the earlier run's output\n")
    seen: list[Record] = []

    def interrupt_at_the_fifth(record: Record) -> None:
        if len(seen) == 4:
            raise Interrupted
        seen.append(record)

    writer = JsonlSink(out, keep_existing=False)
    with pytest.raises(Interrupted):
        run(refs_of(folder), engine, writer, write_every=2, on_record=interrupt_at_the_fifth)
    partial = writer.abort()  # what local mode does: the earlier file stays as it was
    assert out.read_text() == "the earlier run's output\n"
    assert read_records(partial) == seen  # two writes of two before the interruption, none after


def test_the_hooks_hear_every_model_load_and_every_batch(engine: Engine, heard: Heard, photos) -> None:
    folder, _ = photos
    assert [task for task, _ in heard.loads] == [Task.MODERATION] and heard.loads[0][1] > 0
    before = list(heard.batches)
    records: list[Record] = []

    run(refs_of(folder), engine, JsonlSink(folder.parent / "o.jsonl", keep_existing=False), on_record=records.append)

    batches = heard.batches[len(before) :]
    decoded = sum(1 for r in records if r.image is not None)
    assert sum(batches) == decoded and max(batches) <= engine.settings.batch_size


def test_write_every_must_be_positive(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="write_every"):
        run([], engine, JsonlSink(tmp_path / "o.jsonl", keep_existing=False), write_every=0)
