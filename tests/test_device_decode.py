"""The device decode path run on the CPU: equal to the Pillow path within a tolerance, and its fallbacks.

No torchvision build loads with the CPU torch the tests use, so the decode step itself is Pillow's
full-size decode (`pillow_decoder`, what torchvision's CPU `decode_jpeg` returns); everything after
it (orientation, box shrink, resize, crop, normalisation, staging, fallback) is the GPU path's code.
"""

import io
import time
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from imagemill.core.errors import ErrorKind, ImageError
from imagemill.core.schemas import ImageRef
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task
from imagemill.pipeline.engine import Engine
from imagemill.pipeline.prepare.decode import decode
from imagemill.pipeline.prepare.device_decode import (
    DeviceBatch,
    DeviceDecoder,
    orient,
    pillow_decoder,
    resolve_decode_device,
)
from imagemill.pipeline.prepare.jpeg_header import PendingJpeg, read_header
from imagemill.pipeline.prepare.prefetch import InlineImage, Prepared
from imagemill.pipeline.prepare.preprocess import Preprocessor
from imagemill.pipeline.prepare.staging import Staged, Stager
from tests.fixtures.images import mixed_cases, photo_image, photo_jpeg

LIMIT = 64_000_000
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# the recipes of the real-size models (bench/models.py): ViT 224, CLIP shortest edge + crop, BLIP 384
RECIPES = [
    Preprocessor((224, 224), None, None, int(Image.Resampling.BICUBIC), 1 / 255, (0.5,) * 3, (0.5,) * 3),
    Preprocessor(None, 224, (224, 224), int(Image.Resampling.BICUBIC), 1 / 255, CLIP_MEAN, CLIP_STD),
    Preprocessor((384, 384), None, None, int(Image.Resampling.BICUBIC), 1 / 255, CLIP_MEAN, CLIP_STD),
]
# Tolerances on normalised pixels. The paths resample the same pixels (the device path box-averages
# by Pillow's draft and reduce factors), but Pillow shrinks in the DCT domain while the device
# averages decoded pixels: a few 8-bit levels apart at sharp edges and noise, rarely ~20 at a single
# pixel of a 4x-shrunk edge. With std 0.27 one level is 0.015 normalised: the largest difference
# allowed is about 24 levels at any pixel, the mean one level (measured: max 0.30, mean under 0.006).
MAX_ABS, MEAN_ABS = 0.35, 0.015


def pending(data: bytes) -> PendingJpeg:
    header = read_header(data, LIMIT)
    assert header is not None
    return PendingJpeg(data, header)


def pillow_inputs(data: bytes, recipe: Preprocessor, min_side: int) -> np.ndarray:
    picture = decode(data, max_pixels=LIMIT, min_side=min_side).image
    assert picture is not None
    return recipe(picture)


@pytest.mark.parametrize("min_side", [384, 224])
def test_device_path_equals_pillow_path_on_the_photos_and_the_good_mixed_jpegs(min_side: int) -> None:
    jpegs = [photo_jpeg(1280, 960, seed=1)] + [  # and the mixed cases' 1280x960 photo
        c.data for c in mixed_cases() if c.expected_error is None and read_header(c.data, LIMIT) is not None
    ]
    assert len(jpegs) >= 6  # photos, portrait, rotated, upper-case and unicode-named JPEGs
    recipes = [r for r in RECIPES if max(r.crop or r.size or (r.shortest_edge, 0)) <= min_side]
    result = DeviceDecoder(torch.device("cpu"), recipes, min_side).decode([pending(d) for d in jpegs])
    assert result.decoded == list(range(len(jpegs))) and result.rejected == []
    for recipe, batch in zip(recipes, result.inputs, strict=True):
        expected = np.stack([pillow_inputs(d, recipe, min_side) for d in jpegs])
        assert batch.shape == expected.shape and batch.dtype == torch.float32
        diff = np.abs(batch.numpy() - expected)
        assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS, (recipe, diff.max(), diff.mean())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_on_the_device_matches_pillow(orientation: int) -> None:
    picture = photo_image(40, 30, seed=orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    picture.save(buffer, "PNG", exif=exif)  # lossless: the pixels must agree exactly
    expected = np.asarray(decode(buffer.getvalue(), max_pixels=LIMIT).image).transpose(2, 0, 1)
    tensor = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)
    assert np.array_equal(orient(tensor, orientation).numpy(), expected)


def test_fallback_decisions_from_the_header() -> None:
    cases = {case.name: case for case in mixed_cases()}
    for name in ("alpha.png", "cmyk.jpg", "truncated.jpg", "zero.jpg", "text.jpg", "drawing.svg", "animated.gif"):
        assert read_header(cases[name].data, LIMIT) is None, name  # the Pillow path takes it and names its error
    rotated = read_header(cases["rotated.jpg"].data, LIMIT)
    assert rotated is not None and rotated.orientation in (5, 6, 7, 8)
    facts = rotated.decoded()
    assert (facts.width, facts.height, facts.format) == (*cases["rotated.jpg"].expected_size, "JPEG")
    with pytest.raises(ImageError) as raised:  # too many pixels: refused from the header, nothing decoded
        read_header(photo_jpeg(640, 480), 640 * 480 - 1)
    assert raised.value.kind == ErrorKind.TOO_LARGE and "IMAGEMILL_MAX_IMAGE_PIXELS" in raised.value.message


def test_a_batch_the_decoder_rejects_is_redone_without_the_bad_image() -> None:
    calls: list[int] = []

    def picky(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        calls.append(len(datas))
        if any(len(d) == len(bad) for d in datas):
            raise RuntimeError("nvjpeg: bitstream not supported")
        return pillow_decoder(datas, device)

    good = [photo_jpeg(320, 240, seed=s) for s in range(7)]
    bad = photo_jpeg(200, 100, seed=99)
    jpegs = [*good[:3], bad, *good[3:]]
    result = DeviceDecoder(torch.device("cpu"), RECIPES[:1], 224, decoder=picky).decode([pending(d) for d in jpegs])
    assert result.rejected == [3] and result.decoded == [0, 1, 2, 4, 5, 6, 7]
    assert result.inputs[0].shape == (7, 3, 224, 224)
    assert len(calls) <= 1 + 2 * 3  # bisection: a few calls, not one per image


def test_auto_is_the_pillow_path_without_a_gpu() -> None:
    assert resolve_decode_device("auto", torch.device("cpu")) is None
    assert resolve_decode_device("cpu", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="IMAGEMILL_DECODE_DEVICE=cuda"):
        resolve_decode_device("cuda", torch.device("cpu"))
    assert Settings(decode_device="auto").decode_device == "auto"


def test_engine_records_are_the_same_with_the_device_path(tiny_models: dict[str, object]) -> None:
    settings = Settings(
        caption_model=str(tiny_models["caption"]),
        moderation_model=str(tiny_models["moderation"]),
        tags_model=str(tiny_models["tags"]),
        device="cpu",
        caption_max_new_tokens=4,
        batch_size=4,
        tags_threshold=0.0,
    )
    tasks = (Task.MODERATION, Task.TAGS)
    cases = mixed_cases()
    items = [InlineImage(uri=f"mem:{c.name}", data=c.data) for c in cases]
    with Engine(settings, tasks) as pillow_engine:
        assert pillow_engine.stager is None  # CPU models, Pillow decode: today's path, nothing staged
        expected = list(pillow_engine.annotate(items))
    with Engine(settings, tasks, runners=pillow_engine.runners) as engine:
        fallbacks: list[str] = []
        engine.decode_on(torch.device("cpu"))
        assert engine.prefetcher.device_jpegs and engine.stager is not None
        fallback = engine.stager.fallback
        engine.stager.fallback = lambda item, data: (fallbacks.append(item.ref.uri), fallback(item, data))[-1]
        records = list(engine.annotate(items))
    assert [r.uri for r in records] == [r.uri for r in expected]
    for got, want in zip(records, expected, strict=True):
        assert got.image == want.image and got.outcome == want.outcome, got.uri
        assert (got.error.kind if got.error else None) == (want.error.kind if want.error else None)
        if want.moderation is not None:
            assert got.moderation is not None
            for label, score in want.moderation.scores.items():
                assert abs(got.moderation.scores[label] - score) < 0.05, got.uri
    assert fallbacks == []  # every JPEG the header let through decoded on the device path


def test_a_decoder_that_refuses_every_image_is_turned_off() -> None:
    calls: list[int] = []

    def broken(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        calls.append(len(datas))
        raise RuntimeError("nvjpeg: no such mode")

    path = DeviceDecoder(torch.device("cpu"), RECIPES[:1], 224, decoder=broken)
    jpegs = [pending(photo_jpeg(64, 48, seed=s)) for s in range(8)]
    assert path.decode(jpegs).rejected == list(range(8)) and path.disabled
    made = len(calls)
    assert path.decode(jpegs).rejected == list(range(8)) and len(calls) == made  # Pillow's from now on


def test_a_device_path_that_fails_on_a_batch_costs_no_image(tiny_models: dict[str, object]) -> None:
    settings = Settings(moderation_model=str(tiny_models["moderation"]), device="cpu", batch_size=3)
    photos = [InlineImage(uri=f"mem:{i}", data=photo_jpeg(96, 64, seed=i)) for i in range(5)]

    class Exploding(DeviceDecoder):
        def decode(self, jpegs: Sequence[PendingJpeg]) -> DeviceBatch:
            raise torch.OutOfMemoryError("CUDA out of memory")

    with Engine(settings, (Task.MODERATION,)) as engine:
        engine.decode_on(torch.device("cpu"), Exploding(torch.device("cpu"), []))
        records = list(engine.annotate(photos))
    assert [r.uri for r in records] == [p.uri for p in photos]
    assert all(r.error is None and r.moderation is not None and r.image is not None for r in records)


def test_the_next_batch_is_staged_while_the_current_one_runs() -> None:
    staged: list[str] = []
    stager = Stager(torch.device("cpu"), torch.float32, fallback=lambda item, data: None)
    stage = stager.stage

    def recording(batch: list[Prepared]) -> Staged:
        staged.append(batch[0].ref.uri)
        return stage(batch)

    stager.stage = recording  # type: ignore[method-assign]
    batches = [[Prepared(ref=ImageRef(uri=f"mem:{i}"))] for i in range(3)]
    seen = []
    for batch in stager.staged(iter(batches)):
        seen.append(batch[0].ref.uri)
        if batch[0].ref.uri == "mem:0":
            deadline = time.monotonic() + 10
            while "mem:1" not in staged and time.monotonic() < deadline:
                time.sleep(0.01)
            assert "mem:1" in staged  # staged while the models would be running batch 0
    stager.close()
    assert seen == ["mem:0", "mem:1", "mem:2"]
