"""Image statistics (IMAGEMILL_IMAGE_QUALITY): measured on the decoded picture, kept in the record,
usable in `--where`, and part of the signature only when asked for."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from imagemill.core.settings import Settings
from imagemill.core.sinks.files import read_records
from imagemill.core.tasks import Task
from imagemill.local.run import LocalRun
from imagemill.pipeline.prepare.quality import image_quality
from imagemill.records.filters import parse_where
from tests.fixtures.images import photo_image, write_photos


def test_the_statistics_tell_blank_dark_flat_and_blurred_pictures_apart() -> None:
    blank = image_quality(Image.new("RGB", (64, 64), (250, 250, 250)))
    assert blank.low_information and blank.blur == 0 and blank.contrast == 0 and blank.brightness > 0.97
    photo = photo_image(128, 96, seed=3)
    sharp, soft = image_quality(photo), image_quality(photo.filter(ImageFilter.GaussianBlur(3)))
    assert not sharp.low_information and sharp.entropy > 4
    assert soft.blur < sharp.blur / 2  # the variance of the Laplacian falls as edges soften
    dark = image_quality(Image.fromarray((np.asarray(photo) // 8).astype(np.uint8)))
    assert dark.brightness < sharp.brightness / 4


@pytest.mark.slow
def test_a_run_with_statistics_keeps_them_in_records_and_only_then_changes_the_signature(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    write_photos(folder, 3, width=160, height=120)
    Image.new("RGB", (160, 120), (0, 0, 0)).save(folder / "black.png")
    signatures = {}
    for quality in (False, True):
        settings = Settings(tags_model=str(tiny_models["tags"]), device="cpu", image_quality=quality)
        out = tmp_path / f"{quality}.jsonl"
        signatures[quality] = LocalRun(str(folder), (Task.TAGS,), out, settings).run().signature
        records = read_records(out)
        assert all((r.quality is not None) == quality for r in records)
        assert all(("quality" in (r.task_options or {})) == quality for r in records)
    assert signatures[False] != signatures[True]
    # off, the signature is the one every earlier run of these settings gave: no part for the statistics
    from imagemill.pipeline.models import load_runners
    from imagemill.pipeline.signature import pipeline_signature

    plain = Settings(tags_model=str(tiny_models["tags"]), device="cpu")
    assert signatures[False] == pipeline_signature(load_runners(plain, (Task.TAGS,)))
    kept = parse_where(["quality.low_information or quality.brightness < 0.05"])
    assert [r.uri.rsplit("/", 1)[-1] for r in read_records(tmp_path / "True.jsonl") if kept(r)] == ["black.png"]
