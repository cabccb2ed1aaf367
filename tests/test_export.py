"""`imagemill export`: annotated records with their images' original bytes, opened again with
`datasets.load_from_disk` and `webdataset.WebDataset`; gone and replaced images reported and
skipped; shards cut by --shard-size; --where and --only-ok filters; the same from PostgreSQL."""

import io
import json
import secrets
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import datasets
import numpy as np
import pytest
import webdataset
from typer.testing import CliRunner

from imagemill.api import record_columns, record_features
from imagemill.cli import app
from imagemill.core import layout
from imagemill.core.errors import UserError
from imagemill.core.images import ObjectReader, local_path
from imagemill.core.schemas import DedupMark, ImageInfo, Moderation, Record, Tags, TagScore
from imagemill.core.settings import Settings
from imagemill.core.sinks import open_sink
from imagemill.core.sinks.files import parquet_record, parquet_row, read_records
from imagemill.core.tasks import parse_tasks
from imagemill.records.choices import ExportFormat
from imagemill.records.exports import Encoding, Options, export, parse_split, split_of
from imagemill.records.filters import Roles, parse_where
from tests.fixtures.cli import run_cli
from tests.fixtures.images import photo_jpeg, write_mixed
from tests.fixtures.s3 import s3_client


@dataclass(frozen=True)
class Annotated:
    folder: Path
    records_file: Path
    records: list[Record]
    gone: str  # uri of an image deleted after annotation
    replaced: str  # uri of an image overwritten after annotation

    def exportable(self) -> list[Record]:
        return [r for r in self.records if r.uri not in (self.gone, self.replaced)]


@pytest.fixture(scope="module")
def annotated(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Annotated:
    """A folder of test photos (good, broken, hostile) annotated with every task, embedding included;
    then one image deleted and one overwritten, as happens between annotation and export."""
    root = tmp_path_factory.mktemp("export")
    folder = root / "photos"
    write_mixed(folder)
    (folder / "doomed.jpg").write_bytes(photo_jpeg(320, 240, seed=7))
    (folder / "touched.jpg").write_bytes(photo_jpeg(320, 240, seed=8))
    out = root / "records.jsonl"
    env = {
        "IMAGEMILL_CAPTION_MODEL": str(tiny_models["caption"]),
        "IMAGEMILL_MODERATION_MODEL": str(tiny_models["moderation"]),
        "IMAGEMILL_TAGS_MODEL": str(tiny_models["tags"]),
        "IMAGEMILL_TAGS_THRESHOLD": "0",
        "IMAGEMILL_CAPTION_MAX_NEW_TOKENS": "4",
        "IMAGEMILL_DEVICE": "cpu",
    }
    tasks = "caption,moderation,tags,embedding"
    result = run_cli("annotate", str(folder), "--tasks", tasks, "--out", str(out), "-q", env=env)
    assert result.returncode == 0, result.stderr
    (folder / "doomed.jpg").unlink()
    (folder / "touched.jpg").write_bytes(photo_jpeg(640, 480, seed=9))
    uri = (folder / "doomed.jpg").absolute().as_uri()
    return Annotated(folder, out, read_records(out), uri, (folder / "touched.jpg").absolute().as_uri())


def file_bytes(uri: str) -> bytes:
    return local_path(uri).read_bytes()


@pytest.mark.slow
def test_hf_export_opens_with_load_from_disk_holding_the_files_bytes_and_the_records_fields(
    annotated: Annotated, tmp_path: Path
) -> None:
    out = tmp_path / "hf"
    result = run_cli("export", str(annotated.records_file), "--format", "hf", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"1 image gone since annotation, skipped: {annotated.gone}" in result.stderr.replace("\n", "")
    assert "1 image replaced since annotation" in result.stderr

    dataset = datasets.load_from_disk(str(out))
    expected = annotated.exportable()
    assert len(dataset) == len(expected)
    dim = next(r.embedding.dim for r in expected if r.embedding)
    assert dataset.features["embedding"].length == dim  # a fixed-length float sequence
    raw = dataset.cast_column("image", datasets.Image(decode=False))
    for row, record in zip(raw, expected, strict=True):
        assert row["uri"] == record.uri and row["etag"] == record.etag
        if record.error is None:
            assert row["image"]["bytes"] == file_bytes(record.uri)
            assert record.caption and record.moderation and record.tags and record.embedding
            assert row["caption"] == record.caption.text
            assert row["tags"] == [t.tag for t in record.tags.labels]
            assert row["tag_scores"] == [float(np.float32(t.score)) for t in record.tags.labels]
            assert row["flagged"] == record.moderation.flagged
            scores = {label: float(np.float32(score)) for label, score in record.moderation.scores.items()}
            assert row["moderation_scores"] == [{"label": label, "score": s} for label, s in scores.items()]
            assert np.array_equal(np.asarray(row["embedding"], dtype=np.float32), record.embedding.array())
            assert (row["width"], row["height"]) == (record.image.width, record.image.height)  # type: ignore[union-attr]
            assert row["error_kind"] is None and row["error_message"] is None
        else:  # never annotated: no image, the error's kind says why
            assert row["image"] is None and row["error_kind"] == record.error.kind.value
            assert row["error_message"] == record.error.message
            assert row["caption"] is None and row["embedding"] is None and row["tags"] is None
    # decoded, the good images are pictures of the recorded size
    picture = next(row["image"] for row in dataset if row["uri"].endswith("photo_medium.jpg"))
    assert picture.size == (640, 480)


def test_webdataset_shards_hold_the_original_bytes_with_their_real_extension_and_the_record(
    annotated: Annotated, tmp_path: Path
) -> None:
    out = tmp_path / "wds"
    args = [str(annotated.records_file), "--format", "webdataset", "--out", str(out), "--shard-size", "4"]
    result = CliRunner().invoke(app, ["export", *args])
    assert result.exit_code == 0, result.output

    assert "1 image gone since annotation" in result.stderr

    expected = annotated.exportable()
    shards = sorted(out.glob("*.tar"))
    assert [s.name for s in shards] == [f"shard-{n:06d}.tar" for n in range(-(-len(expected) // 4))]
    per_shard = [sum(1 for _ in webdataset.WebDataset(str(s), shardshuffle=False)) for s in shards]
    assert all(n == 4 for n in per_shard[:-1]) and 1 <= per_shard[-1] <= 4

    samples = list(webdataset.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert len(samples) == len(expected)
    extensions = {}
    for sample, record in zip(samples, expected, strict=True):
        assert Record.model_validate_json(sample["json"]) == record
        images = {k: v for k, v in sample.items() if not k.startswith("__") and k != "json"}
        if record.error is None:
            ((ext, data),) = images.items()
            assert data == file_bytes(record.uri)
            extensions[record.uri.rsplit("/", 1)[-1]] = ext
        else:
            assert images == {}
    assert extensions["UPPER.JPG"] == "jpg" and extensions["alpha.png"] == "png"
    assert extensions["animated.gif"] == "gif" and extensions.get("tiny.webp", "webp") == "webp"


def exported_uris(records: list[Record], tmp_path: Path, **options: object) -> list[str]:
    out = tmp_path / f"out-{secrets.token_hex(3)}"
    export(lambda: [records], ExportFormat.WEBDATASET, out, ObjectReader(Settings()), Options(**options))  # type: ignore[arg-type]
    return [
        json.loads(s["json"])["uri"] for s in webdataset.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False)
    ]


def test_where_and_only_ok_keep_the_matching_records(annotated: Annotated, tmp_path: Path) -> None:
    records = annotated.exportable()
    flagged = {r.uri for r in records if r.moderation and r.moderation.flagged}
    ok = [r.uri for r in records if r.error is None]
    assert flagged and set(ok) - flagged  # the tiny model flags some and not others
    assert exported_uris(records, tmp_path, only_ok=True) == ok
    unflagged = exported_uris(records, tmp_path, where=parse_where(["flagged=false"]))
    assert unflagged == [u for u in ok if u not in flagged]  # a record without moderation is neither
    assert exported_uris(records, tmp_path, where=parse_where(["error=truncated"])) == [
        r.uri for r in records if r.error and r.error.kind == "truncated"
    ]
    tag = records[0].tags.labels[0].tag  # type: ignore[union-attr]
    assert exported_uris(records, tmp_path, where=parse_where([f"tag={tag}", "error=none"])) == [
        r.uri for r in records if r.tags and any(t.tag == tag for t in r.tags.labels)
    ]
    assert exported_uris(records, tmp_path, where=parse_where(["format!=jpeg"]), only_ok=True) == [
        r.uri for r in records if r.error is None and r.image and r.image.format != "JPEG"
    ]


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("colour=red", "unknown field 'colour'; choose from flagged, error, tag, format, job"),
        ("flagged=maybe", "expected true or false"),
        ("error=exploded", "expected none or one of"),
        ("flagged and", "a condition is missing at the end"),
        ("moderation.nsfw < high", "moderation.nsfw < high: expected a number"),
        ("(tag = dog", r"a \( is not closed"),
        ("width", "width needs a comparison"),
        ("tag = 'dog", "an unclosed quote"),
    ],
)
def test_a_bad_where_is_refused_in_one_line(where: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_where([where])


def test_bad_input_is_one_line_and_exit_2_leaving_nothing_behind(annotated: Annotated, tmp_path: Path) -> None:
    runner, records = CliRunner(), str(annotated.records_file)
    where = runner.invoke(app, ["export", records, "--format", "hf", "--out", str(tmp_path / "a"), "--where", "x=1"])
    assert where.exit_code == 2 and where.stderr.count("error:") == 1 and "unknown field 'x'" in where.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    taken = runner.invoke(app, ["export", records, "--format", "webdataset", "--out", str(tmp_path / "full"), "-q"])
    assert taken.exit_code == 2 and "already exists and is not empty" in taken.stderr
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    url = runner.invoke(app, ["export", records, "--format", "hf", "--out", "gs://bucket/photos"])
    assert url.exit_code == 2 and "a local directory or an s3://bucket/prefix/, not another URL" in url.stderr
    missing = runner.invoke(app, ["export", str(tmp_path / "no.jsonl"), "--format", "hf", "--out", str(tmp_path / "b")])
    assert missing.exit_code == 2 and missing.stderr.count("error:") == 1 and "no such file" in missing.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no partial export left


def test_export_from_postgresql_reads_the_current_records(annotated: Annotated, pg_url: str, tmp_path: Path) -> None:
    url = f"{pg_url}?table=export_{secrets.token_hex(4)}"
    with open_sink(url) as store:
        store.write(annotated.records, chunk="job/0")
    expected = annotated.exportable()
    runner = CliRunner()
    hf = runner.invoke(app, ["export", url, "--format", "hf", "--out", str(tmp_path / "hf"), "--only-ok", "-q"])
    assert hf.exit_code == 0, hf.output
    assert "1 image gone since annotation" in hf.stderr
    dataset = datasets.load_from_disk(str(tmp_path / "hf")).cast_column("image", datasets.Image(decode=False))
    ok = {r.uri: r for r in expected if r.error is None}
    assert sorted(dataset["uri"]) == sorted(ok)
    for row in dataset:
        record = ok[row["uri"]]
        assert row["image"]["bytes"] == file_bytes(record.uri)
        assert row["caption"] == record.caption.text  # type: ignore[union-attr]
        assert np.array_equal(np.asarray(row["embedding"], dtype=np.float32), record.embedding.array())  # type: ignore[union-attr]
    wds = runner.invoke(app, ["export", url, "--format", "webdataset", "--out", str(tmp_path / "wds"), "-q"])
    assert wds.exit_code == 0, wds.output
    samples = list(webdataset.WebDataset(str(tmp_path / "wds" / "shard-000000.tar"), shardshuffle=False))
    assert sorted(json.loads(s["json"])["uri"] for s in samples) == sorted(r.uri for r in expected)


def test_export_from_an_object_sink_holds_the_current_record_per_image_unless_history(
    annotated: Annotated, tmp_path: Path
) -> None:
    # two jobs wrote to a file:// sink; the second annotated one image again, later: its newer record is current
    sink = tmp_path / "sink"
    sink.mkdir()
    first = annotated.exportable()
    again = first[0].model_copy(update={"processed_at": first[0].processed_at + timedelta(hours=1), "job_id": "job-2"})
    with open_sink(f"file://{sink}/") as writer:
        writer.write(first, "job-1/000000")
        writer.write([again], "job-2/000000")
    runner = CliRunner()
    for flag, out in (([], tmp_path / "current"), (["--history"], tmp_path / "history")):
        result = runner.invoke(app, ["export", f"file://{sink}/", "--format", "webdataset", "--out", str(out), *flag])
        assert result.exit_code == 0, result.output
    shard = str(tmp_path / "current" / "shard-000000.tar")
    current = [Record.model_validate_json(s["json"]) for s in webdataset.WebDataset(shard, shardshuffle=False)]
    assert sorted(r.uri for r in current) == sorted(r.uri for r in first)
    assert next(r for r in current if r.uri == again.uri).job_id == "job-2"
    history = list(webdataset.WebDataset(str(tmp_path / "history" / "shard-000000.tar"), shardshuffle=False))
    assert len(history) == len(first) + 1


@pytest.mark.parametrize(("fmt", "module"), [("hf", "datasets"), ("webdataset", "webdataset")])
def test_without_the_export_extra_it_says_how_to_get_it(
    annotated: Annotated, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import raises ModuleNotFoundError
    out = str(tmp_path / "x")
    result = CliRunner().invoke(app, ["export", str(annotated.records_file), "--format", fmt, "--out", out, "-q"])
    assert result.exit_code == 2 and result.stderr.count("error:") == 1
    assert "needs the export extra: pip install 'imagemill[export]'" in result.stderr
    assert not list(tmp_path.iterdir())


def test_an_export_of_nothing_is_an_empty_dataset_with_the_columns(annotated: Annotated, tmp_path: Path) -> None:
    reader, nothing = ObjectReader(Settings()), Options(where=parse_where(["tag=no such tag"]))
    report = export(lambda: [annotated.records], ExportFormat.HF, tmp_path / "hf", reader, nothing)
    assert (report.read, report.exported, report.filtered) == (len(annotated.records), 0, len(annotated.records))
    empty = datasets.load_from_disk(str(tmp_path / "hf"))
    assert len(empty) == 0 and {"image", "uri", "caption", "tags"} <= set(empty.features)
    export(lambda: [annotated.records], ExportFormat.WEBDATASET, tmp_path / "wds", reader, nothing)
    shard = str(tmp_path / "wds" / "shard-000000.tar")
    assert list(webdataset.WebDataset(shard, shardshuffle=False, empty_check=False)) == []


def test_s3_images_are_read_through_the_storage_code_and_a_deleted_or_replaced_object_is_skipped(
    s3_env: str, bucket: str, tmp_path: Path
) -> None:
    s3 = s3_client(s3_env)
    records = []
    for n, name in enumerate(("kept.jpg", "deleted.jpg", "replaced.jpg")):
        s3.put_object(Bucket=bucket, Key=f"p/{name}", Body=photo_jpeg(64, 48, seed=n))
        etag = s3.head_object(Bucket=bucket, Key=f"p/{name}")["ETag"].strip('"')
        image = ImageInfo(width=64, height=48, format="JPEG")
        records.append(Record(uri=f"s3://{bucket}/p/{name}", etag=etag, image=image, signature="s"))
    s3.delete_object(Bucket=bucket, Key="p/deleted.jpg")
    s3.put_object(Bucket=bucket, Key="p/replaced.jpg", Body=photo_jpeg(64, 48, seed=9))
    report = export(lambda: [records], ExportFormat.WEBDATASET, tmp_path / "wds", ObjectReader(Settings()), Options())
    assert (report.exported, report.missing.shown, report.changed.shown) == (1, [records[1].uri], [records[2].uri])
    (sample,) = webdataset.WebDataset(str(tmp_path / "wds" / "shard-000000.tar"), shardshuffle=False)
    assert sample["jpg"] == photo_jpeg(64, 48, seed=0)


# -- exports ready for training ------------------------------------------------------------------------


def scored(uri: str, nsfw: float | None, tags: dict[str, float], width: int = 640, day: int = 1) -> Record:
    return Record(
        uri=uri,
        signature="s",
        image=ImageInfo(width=width, height=480, format="JPEG"),
        moderation=None if nsfw is None else Moderation(model="m", flagged=nsfw >= 0.5, scores={"nsfw": nsfw}),
        tags=Tags(model="t", labels=[TagScore(tag=tag, score=score) for tag, score in tags.items()]),
        processed_at=datetime(2026, 1, day, tzinfo=UTC),
    )


def test_where_expressions_compare_scores_tags_dates_and_dedup_roles() -> None:
    records = [
        scored("s3://b/a.jpg", 0.1, {"dog": 0.6}),
        scored("s3://b/b.jpg", 0.7, {"dog": 0.2, "cat": 0.5}, width=100),
        scored("s3://b/c.jpg", None, {"cat": 0.9}, day=20),  # no moderation: matches no nsfw comparison
        scored("s3://b/d.jpg", 0.05, {}, day=20),
    ]
    roles = Roles(representatives={"s3://b/a.jpg"}, duplicates={"s3://b/d.jpg"})

    def kept(*texts: str) -> list[str]:
        where = parse_where(list(texts), roles)
        return [r.uri.rsplit("/", 1)[-1] for r in records if where(r)]

    assert kept("moderation.nsfw < 0.2") == ["a.jpg", "d.jpg"]
    assert kept("moderation.nsfw < 0.2 and not duplicate") == ["a.jpg"]
    assert kept("not moderation.nsfw >= 0.2") == ["a.jpg", "c.jpg", "d.jpg"]
    assert kept("tags.cat >= 0.5 or (tag = dog and width > 200)") == ["a.jpg", "b.jpg", "c.jpg"]
    assert kept("tag != dog", "processed_at >= 2026-01-10") == ["c.jpg", "d.jpg"]
    assert kept("representative") == ["a.jpg"] and kept("flagged") == ["b.jpg"]
    assert kept("error = none", "format = jpeg") == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]


def test_splits_deal_records_by_a_hash_of_the_uri_the_same_way_on_every_export() -> None:
    split = parse_split("train=0.9,val=0.1")
    uris = [f"s3://b/{i:05d}.jpg" for i in range(5_000)]
    first = [split_of(uri, split) for uri in uris]
    assert first == [split_of(uri, split) for uri in reversed(uris)][::-1]  # the order changes nothing
    assert 0.87 < first.count("train") / len(uris) < 0.93
    for bad, message in [("train=0.9,val=0.2", "add up to 1.1"), ("train=0.5,train=0.5", "named twice"),
                         ("train", "expected name=share"), ("a b=1", "plain name")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            parse_split(bad)


def test_webdataset_keys_come_from_the_uri_and_survive_another_filter(annotated: Annotated, tmp_path: Path) -> None:
    records = annotated.exportable()

    def keys(**options: object) -> dict[str, str]:
        out = tmp_path / f"k-{secrets.token_hex(3)}"
        export(lambda: [records], ExportFormat.WEBDATASET, out, ObjectReader(Settings()), Options(**options))  # type: ignore[arg-type]
        samples = webdataset.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False)
        return {json.loads(s["json"])["uri"]: s["__key__"] for s in samples}

    everything, some = keys(), keys(only_ok=True)
    assert some and set(some) < set(everything)
    assert all(everything[uri] == key and "." not in key for uri, key in some.items())


def test_history_repeating_an_image_is_counted_and_each_copy_keeps_a_key_of_its_own(
    annotated: Annotated, tmp_path: Path
) -> None:
    good = [r for r in annotated.exportable() if r.error is None][:2]
    again = [r.model_copy(update={"signature": "other"}) for r in good]
    out = tmp_path / "h"
    report = export(lambda: [good + again], ExportFormat.WEBDATASET, out, ObjectReader(Settings()), Options())
    assert report.repeated.count == 2 and report.exported == 4
    samples = list(webdataset.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False))
    assert len({s["__key__"] for s in samples}) == 4


@pytest.mark.slow
def test_a_split_export_twice_is_identical_and_each_split_loads(annotated: Annotated, tmp_path: Path) -> None:
    runs = []
    for name in ("one", "two"):
        out = tmp_path / name
        result = run_cli(
            "export", str(annotated.records_file), "--format", "hf", "--out", str(out), "--only-ok",
            "--split", "train=0.5,val=0.5", "--where", "width >= 1 and not flagged = true",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        loaded = datasets.load_from_disk(str(out))
        assert set(loaded) == {"train", "val"}
        runs.append({split: sorted(loaded[split]["uri"]) for split in loaded})
    assert runs[0] == runs[1]
    kept = parse_where(["width >= 1 and not flagged = true"])
    expected = {r.uri for r in annotated.exportable() if r.error is None and kept(r)}
    assert set(runs[0]["train"]) | set(runs[0]["val"]) == expected
    assert not set(runs[0]["train"]) & set(runs[0]["val"])
    split = parse_split("train=0.5,val=0.5")
    assert all(split_of(uri, split) == "train" for uri in runs[0]["train"])


def test_max_side_and_image_format_re_encode_as_displayed_in_srgb_and_leave_others_byte_identical(
    tmp_path: Path,
) -> None:
    from PIL import Image, ImageCms

    from tests.fixtures.images import _rotated_jpeg

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "rotated.jpg").write_bytes(_rotated_jpeg())  # 640x480 stored, displayed 480x640
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (300, 200), (200, 30, 30)).save(folder / "icc.png", icc_profile=srgb)  # converted, then dropped
    records = [Record(uri=(folder / n).absolute().as_uri(), signature="s") for n in ("rotated.jpg", "icc.png")]

    def shard(options: Options) -> dict[str, dict[str, bytes]]:
        out = tmp_path / f"o-{secrets.token_hex(3)}"
        export(lambda: [records], ExportFormat.WEBDATASET, out, ObjectReader(Settings()), options)
        return {
            json.loads(s["json"])["uri"].rsplit("/", 1)[-1]: s
            for s in webdataset.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False)
        }

    small = shard(Options(encoding=Encoding(max_side=256, image_format="webp", quality=80)))
    rotated = Image.open(io.BytesIO(small["rotated.jpg"]["webp"]))
    assert rotated.format == "WEBP" and rotated.size == (192, 256)  # upright, the longer side 256
    assert "icc_profile" not in Image.open(io.BytesIO(small["icc.png"]["webp"])).info
    kept = shard(Options(encoding=Encoding(max_side=1000)))  # no format: each keeps its own
    assert Image.open(io.BytesIO(kept["rotated.jpg"]["jpg"])).size == (480, 640)
    assert set(kept["icc.png"]) >= {"png"}
    plain = shard(Options())
    assert plain["rotated.jpg"]["jpg"] == (folder / "rotated.jpg").read_bytes()


def test_an_export_to_s3_uploads_the_shards_and_refuses_a_prefix_that_holds_objects(
    annotated: Annotated, s3_env: str, bucket: str, tmp_path: Path
) -> None:
    runner, records = CliRunner(), str(annotated.records_file)
    out = f"s3://{bucket}/exports/v1/"
    result = runner.invoke(app, ["export", records, "--format", "webdataset", "--out", out, "--only-ok", "-q"])
    assert result.exit_code == 0, result.output
    client = s3_client(s3_env)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="exports/v1/")["Contents"]]
    assert keys == ["exports/v1/shard-000000.tar"]
    client.download_file(bucket, keys[0], str(tmp_path / "s.tar"))
    uris = [json.loads(s["json"])["uri"] for s in webdataset.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False)]
    assert uris == [r.uri for r in annotated.exportable() if r.error is None]
    again = runner.invoke(app, ["export", records, "--format", "webdataset", "--out", out, "-q"])
    assert again.exit_code == 2 and again.stderr.count("error:") == 1 and "already holds objects" in again.stderr


# -- one record-to-columns layout ----------------------------------------------------------------------


def test_export_and_the_python_api_give_the_same_columns_for_the_same_records(
    annotated: Annotated, tmp_path: Path
) -> None:
    records = annotated.exportable()
    export(lambda: [records], ExportFormat.HF, tmp_path / "hf", ObjectReader(Settings()), Options())
    exported = datasets.load_from_disk(str(tmp_path / "hf"))
    tasks = parse_tasks("caption,moderation,tags,embedding")
    api = datasets.Dataset.from_dict(record_columns(records, tasks), features=record_features(tasks))
    assert api.column_names == list(layout.api_columns(tasks))
    assert set(api.column_names) < set(exported.column_names)
    for name in api.column_names:
        if name == "embedding":  # export knows the size of every record's: the same floats, fixed length
            assert exported.features[name].length == next(r.embedding.dim for r in records if r.embedding)
            assert exported.features[name].feature == api.features[name].feature
        else:
            assert exported.features[name] == api.features[name], name
        assert exported[name] == api[name], name
    assert exported["tags"][0] and isinstance(exported["tags"][0][0], str)


def test_the_earlier_layout_is_written_on_request_with_a_deprecation_warning(
    annotated: Annotated, tmp_path: Path
) -> None:
    out = tmp_path / "v1"
    result = CliRunner().invoke(
        app, ["export", str(annotated.records_file), "--format", "hf", "--out", str(out), "--layout", "v1", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert "--layout v1 is deprecated" in result.stderr
    old = datasets.load_from_disk(str(out))
    assert {"tags", "scores", "error"} <= set(old.column_names) and "tag_scores" not in old.column_names
    row = next(r for r in old if r["error"] is None)
    assert set(row["tags"][0]) == {"tag", "score"} and set(row["scores"]) == {"normal", "nsfw"}
    bad = CliRunner().invoke(app, ["export", str(annotated.records_file), "--format", "hf", "--out", str(out) + "x",
                                   "--layout", "v3"])  # fmt: skip
    assert bad.exit_code == 2 and "--layout v3: expected v2 or v1" in bad.stderr


def test_duplicate_and_representative_read_the_records_own_dedup_mark_without_a_groups_file() -> None:
    marks = {"a": DedupMark(group="s3://b/a.jpg", representative=True, threshold=0.95),
             "b": DedupMark(group="s3://b/a.jpg", representative=False, threshold=0.95),
             "c": DedupMark(group=None, representative=True, threshold=0.95), "d": None}  # fmt: skip
    records = [scored(f"s3://b/{n}.jpg", 0.1, {}).model_copy(update={"dedup": m}) for n, m in marks.items()]

    def kept(text: str) -> list[str]:
        where = parse_where([text])
        assert where.names_roles and [where.unmarked(r) for r in records] == [False, False, False, True]
        return [r.uri.rsplit("/", 1)[-1] for r in records if where(r)]

    assert kept("not duplicate") == ["a.jpg", "c.jpg", "d.jpg"]
    assert kept("representative") == ["a.jpg"] and kept("duplicate") == ["b.jpg"]
    # the mark goes through both file formats as it is
    for record in records[:3]:
        assert Record.model_validate_json(record.model_dump_json()).dedup == record.dedup
        assert parquet_record(parquet_row(record)).dedup == record.dedup
