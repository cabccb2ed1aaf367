"""`imagemill annotate --gpus`: engine processes (CPU children here, `cpu:N`) write what one process writes."""

import os
import signal
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imagemill.cli import app
from imagemill.core.errors import ErrorKind
from imagemill.core.images import file_uri
from imagemill.core.schemas import ImageRef, Record
from imagemill.core.settings import get_settings
from imagemill.core.sinks.files import read_records
from imagemill.core.tasks import Task
from imagemill.local.pool import LocalPool, child_env, plan_children
from tests.fixtures.distributed import wait_for
from tests.fixtures.images import photo_jpeg

TASKS = "caption,moderation,tags"


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Eight small photos and a truncated JPEG: three chunks of the tests' batch size (4)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(8):
        (folder / f"photo_{i}.jpg").write_bytes(photo_jpeg(96, 72, seed=i))
    broken = photo_jpeg(96, 72, seed=9)
    (folder / "truncated.jpg").write_bytes(broken[: int(len(broken) * 0.4)])
    return folder


def comparable(records: list[Record]) -> list[dict]:
    return [r.model_dump(mode="json", exclude={"timings", "processed_at"}) for r in records]


@pytest.mark.slow
def test_two_cpu_children_write_the_records_one_process_writes(
    photos: Path, model_env: dict[str, str], tmp_path: Path
) -> None:
    runner = CliRunner()
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    single = runner.invoke(app, ["annotate", str(photos), "--tasks", TASKS, "--out", str(one), "-q"])
    assert single.exit_code == 0, single.output
    pooled = runner.invoke(app, ["annotate", str(photos), "--tasks", TASKS, "--out", str(two), "-q", "--gpus", "cpu:2"])
    assert pooled.exit_code == 0, pooled.output
    expected, got = read_records(one), read_records(two)
    assert [r.uri for r in got] == sorted(file_uri(p) for p in photos.iterdir())  # listing order
    assert comparable(got) == comparable(expected)
    assert [r.error.kind for r in got if r.error] == [ErrorKind.TRUNCATED]
    # the children's accounting, summed: the summary shows where their time went
    shown = " ".join(pooled.output.split())
    assert "per image │ read" in shown and "waiting for input" in shown and "-bound" in shown


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dead", "lost_chunks"),
    [
        (1, [4, 5, 6, 7]),  # chunk 1, dealt to the dead child; chunks 0 and 2 went to the live one
        (0, [0, 1, 2, 3, 8]),  # chunks 0 and 2: the live child's messages still find it (slot 1, now first)
    ],
)
def test_a_dead_child_costs_its_chunks_as_worker_lost_records_and_never_hangs(
    photos: Path, model_env: dict[str, str], dead: int, lost_chunks: list[int]
) -> None:
    slots = plan_children("cpu:2")
    assert slots is not None
    refs = [ImageRef(uri=file_uri(p)) for p in sorted(photos.iterdir())]
    with LocalPool(get_settings(), (Task.MODERATION,), slots) as pool:
        assert pool.visible == ["", ""]  # what each child saw in CUDA_VISIBLE_DEVICES, set before torch
        os.kill(pool.children[dead].process.pid, signal.SIGKILL)
        pool.children[dead].process.join()
        records = list(pool.annotate(refs))
    assert [r.uri for r in records] == [ref.uri for ref in refs]
    lost = [i for i, r in enumerate(records) if r.error and r.error.kind == ErrorKind.WORKER_LOST]
    assert lost == lost_chunks
    assert all(r.moderation for i, r in enumerate(records) if i not in lost_chunks and i != 8)
    # the live child's accounting arrived before `annotate` ended: it covers the images it annotated
    assert pool.figures.images == 9 - len(lost_chunks)


@pytest.mark.slow
def test_a_stalled_child_holds_back_no_more_than_the_reorder_window(photos: Path, model_env: dict[str, str]) -> None:
    # a GPU that hangs (here: a child stopped with SIGSTOP) must not make the parent buffer every
    # other child's records for the rest of the listing while it waits for the stalled chunk
    slots = plan_children("cpu:2")
    assert slots is not None
    files = sorted(photos.iterdir())
    with LocalPool(get_settings(), (Task.MODERATION,), slots) as pool:
        chunks = pool.window + 8
        refs = [ImageRef(uri=file_uri(files[i % len(files)])) for i in range(chunks * pool.chunk_size)]
        stalled, running = pool.children
        os.kill(stalled.process.pid, signal.SIGSTOP)
        try:
            records: list[Record] = []
            annotating = threading.Thread(target=lambda: records.extend(pool.annotate(refs)), daemon=True)
            annotating.start()
            wait_for(lambda: pool.dealt >= pool.window, 120, "the running child to fill the window")
            dealt = pool.dealt
            # nothing more is dealt while the oldest chunk is stalled: the running child idles
            with pytest.raises(AssertionError, match="timed out"):
                wait_for(lambda: pool.dealt != dealt, 3, "another chunk dealt")
            assert (dealt, pool.delivered) == (pool.window, 0)
            assert running.process.is_alive()
        finally:
            os.kill(stalled.process.pid, signal.SIGCONT)
        annotating.join(timeout=120)
        assert not annotating.is_alive()
    assert [r.uri for r in records] == [ref.uri for ref in refs]
    assert pool.dealt == pool.delivered == chunks


def test_each_child_sees_one_gpu_as_cuda_0() -> None:
    slots = plan_children("0,2", detect=lambda: ["0", "1", "2"])
    assert slots is not None
    assert [child_env(slot) for slot in slots] == [
        {"CUDA_VISIBLE_DEVICES": "0", "IMAGEMILL_DEVICE": "cuda:0"},
        {"CUDA_VISIBLE_DEVICES": "2", "IMAGEMILL_DEVICE": "cuda:0"},
    ]
    every = plan_children("all", detect=lambda: ["0", "1"])
    assert every is not None and [child_env(s)["CUDA_VISIBLE_DEVICES"] for s in every] == ["0", "1"]
    assert plan_children("cpu") is None  # this process, as before
    cpus = plan_children("cpu:3")
    assert cpus is not None and {child_env(s)["CUDA_VISIBLE_DEVICES"] for s in cpus} == {""}


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("7", "--gpus 7: no GPU 7"),
        ("all", "--gpus all: no NVIDIA GPU found"),
        ("cpu:0", "cpu:N needs at least one process"),
        ("cpu:x", "expected all, cpu, cpu:N"),
        ("0,0", "a GPU is listed twice"),
    ],
)
def test_a_bad_gpus_value_is_one_line_and_exit_2(
    value: str, says: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: this machine has no GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    result = CliRunner().invoke(app, ["annotate", str(tmp_path), "--gpus", value, "--out", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2
    assert says in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "o.jsonl").exists()
