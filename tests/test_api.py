"""The Python API: `Annotator` on paths, URIs, bytes and PIL images, and its datasets and Ray adapters."""

import hashlib
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pandas
import pytest
from PIL import Image
from pydantic import ValidationError

from imagemill import Annotator, BatchAnnotator, InlineImage
from imagemill.core.errors import ErrorKind
from imagemill.core.images import file_uri
from imagemill.core.schemas import Record
from imagemill.core.tasks import Task
from imagemill.pipeline.prepare.decode import from_image
from tests.fixtures.images import mixed_cases, photo_image, photo_jpeg
from tests.fixtures.s3 import s3_client

ALL = ("caption", "moderation", "tags")


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def kind(record: Record) -> str | None:
    return record.error.kind.value if record.error else None


def assert_annotated(record: Record) -> None:
    assert record.error is None, record.error
    assert record.caption and record.caption.text
    assert record.moderation and set(record.moderation.scores) == {"normal", "nsfw"}
    assert record.tags and record.tags.labels


@pytest.fixture(scope="module")
def annotator(tiny_models: dict[str, Path]) -> Iterator[Annotator]:
    """One Annotator for the module (models load once), configured by keyword overrides alone."""
    with Annotator(
        tasks=ALL,
        caption_model=str(tiny_models["caption"]),
        moderation_model=str(tiny_models["moderation"]),
        tags_model=str(tiny_models["tags"]),
        tags_threshold=0.0,
        caption_max_new_tokens=6,
        batch_size=3,
        fetch_threads=2,
        device="cpu",
    ) as shared:
        yield shared


def test_a_path_a_pil_image_and_bad_bytes_give_three_records_in_order(
    model_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(photo_jpeg(320, 240, seed=1))
    bad = b"this is not an image at all"
    with Annotator(tasks=("caption", "moderation", "tags")) as annotator:  # settings from the environment
        records = list(annotator.annotate([path, photo_image(200, 100, seed=2), bad]))
    assert len(records) == 3
    first, second, third = records
    assert first.uri == file_uri(path) and first.etag and first.bytes == path.stat().st_size
    assert_annotated(first)
    assert first.image and (first.image.width, first.image.height, first.image.format) == (320, 240, "JPEG")
    assert second.uri == "pil:1"
    assert_annotated(second)
    assert second.image and (second.image.width, second.image.height) == (200, 100)
    assert third.uri == "bytes:sha256:" + hashlib.sha256(bad).hexdigest()[:16]
    assert third.error and third.error.kind == ErrorKind.NOT_AN_IMAGE and third.error.message
    assert third.caption is None and third.moderation is None and third.tags is None
    assert third.bytes == len(bad) and third.etag == hashlib.sha256(bad).hexdigest()
    assert len({r.signature for r in records}) == 1


def test_s3_and_file_uris_and_missing_ones_are_records_too(
    model_env: dict[str, str], s3_env: str, bucket: str, tmp_path: Path
) -> None:
    s3_client(s3_env).put_object(Bucket=bucket, Key="photos/a b.jpg", Body=photo_jpeg(300, 200, seed=3))
    local = tmp_path / "local.png"
    photo_image(120, 90, seed=4).save(local)
    items = [
        f"s3://{bucket}/photos/a b.jpg",
        f"s3://{bucket}/photos/gone.jpg",
        local.as_uri(),
        str(tmp_path / "no.jpg"),
    ]
    with Annotator(tasks="moderation") as annotator:
        records = list(annotator.annotate(items))
    assert [r.uri for r in records] == [*items[:3], file_uri(tmp_path / "no.jpg")]
    assert [kind(r) for r in records] == [None, "not_found", None, "not_found"]
    assert records[0].etag and records[0].image and records[0].image.width == 300
    assert records[0].moderation and records[0].caption is None and records[0].tags is None


def test_order_is_kept_across_batches_whatever_each_item_is(annotator: Annotator, tmp_path: Path) -> None:
    items: list[object] = []
    expected: list[int | str] = []  # each good image's width, or the error kind
    for i in range(14):  # more than the batch (3) and the prefetch window: out-of-order work
        width = 64 + 8 * i
        picture = photo_image(width, 48, seed=i)
        if i % 5 == 4:
            encoded = png(picture)
            items.append(encoded[: len(encoded) // 2] if i % 2 else b"")
            expected.append("truncated" if i % 2 else "empty")
            continue
        if i % 3 == 0:
            path = tmp_path / f"{i}.png"
            picture.save(path)
            items.append(path)
        elif i % 3 == 1:
            items.append(png(picture))
        else:
            items.append(picture)
        expected.append(width)
    records = list(annotator.annotate(iter(items)))  # any iterable, consumed lazily
    got = [kind(r) or (r.image.width if r.image else None) for r in records]
    assert [str(g) for g in got] == [str(e) for e in expected]


def test_a_picture_goes_through_the_same_path_as_its_file(annotator: Annotator) -> None:
    picture = photo_image(160, 120, seed=7)
    from_bytes, from_pil = list(annotator.annotate([png(picture), picture]))
    assert from_bytes.caption and from_pil.caption and from_bytes.caption.text == from_pil.caption.text
    assert from_bytes.moderation and from_pil.moderation
    assert from_bytes.moderation.scores == pytest.approx(from_pil.moderation.scores)
    assert from_bytes.tags and from_pil.tags
    assert [t.tag for t in from_bytes.tags.labels] == [t.tag for t in from_pil.tags.labels]


def test_every_mixed_case_as_an_opened_picture_matches_its_file(annotator: Annotator, tmp_path: Path) -> None:
    # orientation, CMYK, 16-bit, palette, alpha, animation: conversions apply to pictures too;
    # a truncated file opened lazily fails on loading, as it does when decoded from bytes
    cases = [c for c in mixed_cases() if c.expected_error in (None, "truncated")]
    pictures = [Image.open(io.BytesIO(case.data)) for case in cases]
    paths = []
    for case in cases:
        (tmp_path / case.name).write_bytes(case.data)
        paths.append(tmp_path / case.name)
    as_pictures = list(annotator.annotate(pictures))
    as_files = list(annotator.annotate(paths))
    for case, picture, file in zip(cases, as_pictures, as_files, strict=True):
        assert kind(picture) == kind(file) == case.expected_error, case.name
        if case.expected_size:
            assert picture.image and (picture.image.width, picture.image.height) == case.expected_size, case.name
            assert file.image and picture.image.format == file.image.format, case.name


def test_a_caller_given_id_names_an_inline_image(annotator: Annotator) -> None:
    (record,) = annotator.annotate([InlineImage(uri="catalogue/42", data=photo_image(80, 60))])
    assert record.uri == "catalogue/42" and record.error is None and record.bytes is None


def test_pixel_limit_applies_to_pictures_in_memory(tiny_models: dict[str, Path], annotator: Annotator) -> None:
    decoded = from_image(photo_image(300, 200), max_pixels=300 * 200, min_side=50)
    assert (
        decoded.image.mode == "RGB" and min(decoded.image.size) >= 50 and (decoded.width, decoded.height) == (300, 200)
    )
    with Annotator(tasks="moderation", settings=annotator.settings, max_image_pixels=10_000) as small:
        records = list(small.annotate([photo_image(200, 100), photo_image(50, 40)]))
    assert [kind(r) for r in records] == ["too_large", None]


def test_datasets_map_adds_flat_columns(annotator: Annotator) -> None:
    pictures = [photo_image(64 + 4 * i, 48, seed=i) for i in range(5)]
    pictures[4] = photo_image(400, 300, seed=9)  # over the limit below
    dataset = datasets.Dataset.from_dict(
        {"id": list(range(5)), "image": pictures},
        features=datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image()}),
    )
    with Annotator(tasks=ALL, settings=annotator.settings, max_image_pixels=100_000) as limited:
        annotate_batch = limited.for_datasets(image_column="image")
        # batch_size=2: the error (the last, too large picture) comes in a later batch than the first
        out = dataset.map(
            annotate_batch, batched=True, batch_size=2, features=annotate_batch.features(dataset.features)
        )
    assert out.column_names == [
        "id",
        "image",
        "caption",
        "flagged",
        "moderation_scores",
        "tags",
        "tag_scores",
        "error_kind",
        "error_message",
    ]
    rows = out.remove_columns("image").to_list()
    assert [row["id"] for row in rows] == [0, 1, 2, 3, 4]
    assert [row["error_kind"] for row in rows] == [None, None, None, None, "too_large"]
    for row in rows[:4]:
        assert isinstance(row["caption"], str) and row["caption"]
        assert isinstance(row["flagged"], bool)
        assert {s["label"] for s in row["moderation_scores"]} == {"normal", "nsfw"}
        assert row["tags"] and len(row["tags"]) == len(row["tag_scores"])
    assert rows[4]["caption"] is None and rows[4]["tags"] is None and rows[4]["error_message"]


def test_datasets_undecoded_image_cells_are_read_from_their_bytes(annotator: Annotator) -> None:
    annotate_batch = annotator.for_datasets(image_column="image")
    batch = {"image": [{"bytes": png(photo_image(90, 60)), "path": None}, {"bytes": b"junk", "path": None}]}
    columns = annotate_batch(batch)
    assert columns["error_kind"] == [None, "not_an_image"]
    assert isinstance(columns["caption"][0], str) and columns["caption"][1] is None


def test_ray_shaped_batches_keep_their_columns_and_gain_results(
    tiny_models: dict[str, Path], annotator: Annotator, tmp_path: Path
) -> None:
    # what Ray Data passes with batch_format="numpy": a dict of arrays; equal-sized images as one 4-D array
    annotate_batch = BatchAnnotator(tasks=("moderation", "tags"), image_column="image", settings=annotator.settings)
    try:
        images = np.stack([np.asarray(photo_image(72, 56, seed=i)) for i in range(4)])
        batch = {"id": np.arange(4), "image": images}
        out = annotate_batch(batch)
        assert out["id"] is batch["id"] and out["image"] is images
        assert set(out) == {
            "id",
            "image",
            "flagged",
            "moderation_scores",
            "tags",
            "tag_scores",
            "error_kind",
            "error_message",
        }
        assert all(len(column) == 4 and column.ndim == 1 for column in out.values() if column is not images)
        assert list(out["error_kind"]) == [None] * 4
        assert all(isinstance(flag, bool) for flag in out["flagged"])
        assert all(isinstance(tags, list) and tags for tags in out["tags"])

        # a column of URIs (e.g. a manifest read by Ray), one of them missing
        good = tmp_path / "good.png"
        photo_image(100, 80).save(good)
        paths = {"path": np.array([str(good), str(tmp_path / "missing.png")])}
        annotate_batch.image_column = "path"
        by_path = annotate_batch(paths)
        annotate_batch.image_column = "image"
        assert list(by_path["error_kind"]) == [None, "not_found"]

        # batch_format="pandas": a DataFrame in, the same columns out
        frame = pandas.DataFrame({"id": [7, 8], "image": [png(photo_image(64, 64)), b""]})
        from_frame = annotate_batch(frame)
        assert list(from_frame["id"]) == [7, 8] and list(from_frame["error_kind"]) == [None, "empty"]
    finally:
        annotate_batch.close()


def test_settings_overrides_are_validated_before_any_model_loads() -> None:
    with pytest.raises(TypeError, match="unknown setting batchsize"):
        Annotator(batchsize=8)
    with pytest.raises(ValidationError, match="batch_size"):
        Annotator(batch_size=0)
    with pytest.raises(ValueError, match="unknown task"):
        Annotator(tasks=("caption", "colour"))


def test_one_path_instead_of_a_list_is_refused_and_a_closed_annotator_refuses(tiny_models: dict[str, Path]) -> None:
    with Annotator(tasks="moderation", moderation_model=str(tiny_models["moderation"]), device="cpu") as annotator:
        assert annotator.tasks == (Task.MODERATION,)
        with pytest.raises(TypeError, match="iterable of images"):
            annotator.annotate("photo.jpg")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="cannot annotate a int"):
            list(annotator.annotate([3]))  # type: ignore[list-item]
        with pytest.raises(ValueError, match="cannot read https://"):
            list(annotator.annotate(["https://example.com/a.jpg"]))
    with pytest.raises(RuntimeError, match="closed"):
        annotator.annotate([])


def test_importing_imagemill_and_the_api_does_not_load_torch() -> None:
    code = (
        "import sys, imagemill\n"
        "from imagemill import Annotator, BatchAnnotator, InlineImage\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "try:\n"
        "    imagemill.worker\n"
        "except AttributeError:\n"
        "    print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
