"""`imagemill export`: annotated records with their images' original bytes, opened again with
`datasets.load_from_disk` and `webdataset.WebDataset`; gone and replaced images reported and
skipped; shards cut by --shard-size; --where and --only-ok filters; the same from PostgreSQL."""

import json
import secrets
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import datasets
import numpy as np
import pytest
import webdataset
from typer.testing import CliRunner

from imagemill.cli import app
from imagemill.core.errors import UserError
from imagemill.core.schemas import ImageInfo, Record
from imagemill.core.settings import Settings
from imagemill.core.storage import ObjectReader, local_path
from imagemill.core.stores import open_writer
from imagemill.core.stores.files import read_records
from imagemill.pipeline.exports import ExportFormat, Options, export
from imagemill.pipeline.record_filter import parse_where
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
            assert row["tags"] == [{"tag": t.tag, "score": t.score} for t in record.tags.labels]
            assert row["flagged"] == record.moderation.flagged
            assert row["scores"] == record.moderation.scores
            assert np.array_equal(np.asarray(row["embedding"], dtype=np.float32), record.embedding.array())
            assert (row["width"], row["height"]) == (record.image.width, record.image.height)  # type: ignore[union-attr]
            assert row["error"] is None
        else:  # never annotated: no image, the error's kind says why
            assert row["image"] is None and row["error"] == record.error.kind.value
            assert row["caption"] is None and row["embedding"] is None
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
        ("flagged", "expected field=value or field!=value"),
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
    url = runner.invoke(app, ["export", records, "--format", "hf", "--out", "s3://bucket/photos"])
    assert url.exit_code == 2 and "a local directory, not a URL" in url.stderr
    missing = runner.invoke(app, ["export", str(tmp_path / "no.jsonl"), "--format", "hf", "--out", str(tmp_path / "b")])
    assert missing.exit_code == 2 and missing.stderr.count("error:") == 1 and "no such file" in missing.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no partial export left


def test_export_from_postgresql_reads_the_current_records(annotated: Annotated, pg_url: str, tmp_path: Path) -> None:
    url = f"{pg_url}?table=export_{secrets.token_hex(4)}"
    with open_writer(url) as store:
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
    with open_writer(f"file://{sink}/") as writer:
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
