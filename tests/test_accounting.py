"""Per-image accounting in a local run: stage seconds that add up to the wall time, starvation when
decode bounds the run, the verdict and the cost in the summary, and the rate `estimate` reads back."""

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from imagemill.core.accounting import Figures, bound
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task
from imagemill.local.run import LocalRun
from imagemill.pipeline.sources import S3Source, open_source
from imagemill.pipeline.sources.counting import Count, count_images
from tests.fixtures.cli import run_cli
from tests.fixtures.images import photo_image, write_photos
from tests.fixtures.s3 import s3_client


def _settings(model_env: dict[str, str], tmp_path: Path, **overrides: object) -> Settings:
    return Settings(rates_file=tmp_path / "rates.jsonl", **overrides)  # type: ignore[arg-type]


def _large_pngs(folder: Path, count: int) -> None:
    """PNGs cannot be decoded reduced (JPEG's draft mode can): each is a full 960x720 decode, many
    times the tiny models' work on the 64-pixel input it becomes."""
    folder.mkdir(parents=True, exist_ok=True)
    picture = photo_image(960, 720)
    for i in range(count):
        picture.save(folder / f"large_{i:03d}.png", compress_level=1)


def test_a_local_runs_stage_times_add_up_to_its_wall_time(model_env: dict[str, str], tmp_path: Path) -> None:
    # enough images that what is outside the run loop (opening and closing the file) is a small part
    write_photos(tmp_path / "photos", 48, 320, 240)
    run = LocalRun(str(tmp_path / "photos"), (Task.CAPTION, Task.MODERATION, Task.TAGS), tmp_path / "out.jsonl",
                   _settings(model_env, tmp_path))  # fmt: skip
    done = run.run()
    figures = done.figures
    assert figures is not None and figures.images == 48
    # the run's thread waits for input, runs the models, builds and hands on records or writes: together,
    # its wall time (the waits for the GIL between them included: on a busy machine they are not small)
    assert figures.accounted_s == pytest.approx(done.seconds, rel=0.10)
    per_image = figures.per_image()
    assert set(per_image) == {"read", "decode", "preprocess", "model:caption", "model:moderation", "model:tags",
                              "records", "write"}  # fmt: skip
    assert all(seconds > 0 for seconds in per_image.values()), per_image
    assert 0 < (figures.busy_ratio or 0) <= 1


def test_the_models_starve_when_decode_is_the_bottleneck(model_env: dict[str, str], tmp_path: Path) -> None:
    _large_pngs(tmp_path / "large", 12)
    settings = _settings(model_env, tmp_path, decode_threads=1)
    done = LocalRun(str(tmp_path / "large"), (Task.MODERATION,), tmp_path / "out.jsonl", settings).run()
    figures = done.figures
    assert figures is not None and figures.starved_s > 0
    assert figures.stage("decode") > figures.stage("model:moderation")
    verdict = bound(figures)
    assert verdict is not None and verdict.startswith("decode-bound: models idle"), verdict
    assert (figures.starved_ratio or 0) > 0.5


@pytest.mark.slow  # the `imagemill` command in a subprocess
def test_the_summary_says_what_bounds_the_run_and_what_it_cost(model_env: dict[str, str], tmp_path: Path) -> None:
    _large_pngs(tmp_path / "large", 8)
    env = {"IMAGEMILL_COST_PER_HOUR": "36", "IMAGEMILL_RATES_FILE": str(tmp_path / "rates.jsonl")}
    result = run_cli("annotate", str(tmp_path / "large"), "--tasks", "moderation", "--out", str(tmp_path / "o.jsonl"),
                     "--quiet", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = " ".join(result.stderr.split())
    assert "decode-bound: models idle" in summary
    assert re.search(r"per image │ read [0-9.]+ ms · decode [0-9.]+ ms · preprocess [0-9.]+ ms · moderation", summary)
    assert "per 1,000 images" in summary


@pytest.mark.slow  # three `imagemill` commands in subprocesses
def test_estimate_predicts_a_second_run_from_the_first_with_its_spread(
    model_env: dict[str, str], tmp_path: Path
) -> None:
    write_photos(tmp_path / "photos", 12, 320, 240)
    env = {"IMAGEMILL_COST_PER_HOUR": "3.6", "IMAGEMILL_RATES_FILE": str(tmp_path / "rates.jsonl")}
    before = run_cli("estimate", str(tmp_path / "photos"), "--tasks", "moderation", env=env)
    assert before.returncode == 0, before.stderr
    assert "no estimate: no run of this pipeline has been measured" in " ".join(before.stdout.split())
    for _ in range(2):  # two runs: two samples, a spread
        ran = run_cli("annotate", str(tmp_path / "photos"), "--tasks", "moderation", "--out",
                      str(tmp_path / "out.jsonl"), "--force", "--quiet", env=env)  # fmt: skip
        assert ran.returncode == 0, ran.stderr
    after = run_cli("estimate", str(tmp_path / "photos"), "--tasks", "moderation", "--json", env=env)
    assert after.returncode == 0, after.stderr
    document = json.loads(after.stdout)
    assert document["images"] == 12 and document["samples"] == 2
    prediction = document["prediction"]
    assert 0 < prediction["fastest_s"] <= prediction["seconds"] <= prediction["slowest_s"]
    assert prediction["cost"] == pytest.approx(prediction["seconds"] * 3.6 / 3600)
    # another pipeline has no history of its own
    other = run_cli("estimate", str(tmp_path / "photos"), "--tasks", "tags", "--json", env=env)
    assert json.loads(other.stdout)["prediction"] is None


def test_figures_subtract_to_a_spans_share_and_survive_the_registrys_flat_form() -> None:
    earlier = Figures(images=2, wall_s=1.0, cpu_s=1.5, model_s=0.5, model_cpu_s=1.0, starved_s=0.4,
                      stages={"read": 0.1, "model:tags": 0.5, "write": 0.05})  # fmt: skip
    later = earlier + Figures(images=3, wall_s=2.0, model_s=1.9, starved_s=0.05, stages={"model:tags": 1.9})
    share = later - earlier
    assert share.images == 3 and share.stage("model:tags") == pytest.approx(1.9)
    assert Figures.from_fields(later.fields()) == later
    assert bound(share) is not None and bound(share).startswith("model-bound: models busy 95% (tags 100% of it)")
    assert bound(Figures()) is None


def test_a_broken_image_costs_no_decode_seconds_yet_counts_as_an_image(
    model_env: dict[str, str], tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (96, 96), "red").save(folder / "ok.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    done = LocalRun(str(folder), (Task.MODERATION,), tmp_path / "out.jsonl", _settings(model_env, tmp_path)).run()
    assert done.figures is not None and done.figures.images == 2
    assert done.outcomes["annotated"] == 1


def test_accounting_switched_off_records_nothing(model_env: dict[str, str], tmp_path: Path) -> None:
    write_photos(tmp_path / "photos", 4, 160, 120)
    settings = _settings(model_env, tmp_path, accounting=False)
    done = LocalRun(str(tmp_path / "photos"), (Task.MODERATION,), tmp_path / "out.jsonl", settings).run()
    assert done.outcomes["annotated"] == 4
    assert done.figures == Figures()


def test_a_huge_s3_prefix_is_sampled_by_sub_prefix_and_a_folder_counted(
    s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    client = s3_client(s3_endpoint)
    for day in range(10):
        for n in range(3):
            client.put_object(Bucket=bucket, Key=f"photos/day{day}/p{n}.jpg", Body=b"x")
    client.put_object(Bucket=bucket, Key="photos/top.jpg", Body=b"x")
    source = S3Source(bucket, "photos/", client, page_size=4)
    assert count_images(source, 100) == Count(31, True, "counted")
    sampled = count_images(source, 20, sample=4)  # each sampled day may hold up to 20 // 4
    assert sampled.images == 31 and not sampled.exact  # the sampled days hold 3 like the others
    assert sampled.how == "sampled: 4 of 10 sub-prefixes counted, the rest extrapolated"
    write_photos(tmp_path / "flat", 3, 32, 24)
    folder = open_source(str(tmp_path / "flat"), Settings())
    assert count_images(folder, 2) == Count(2, False, "at least 2: counting stopped there (--limit)")
