"""`imagemill annotate` end to end: a real subprocess, tiny models, real files and an S3 server."""

import json
from pathlib import Path

import pytest

from imagemill.core.images import file_uri
from imagemill.core.sinks.files import read_records
from tests.fixtures.cli import run_cli
from tests.fixtures.images import Case, write_mixed
from tests.fixtures.s3 import s3_client


def check_records(records: list, cases: list[Case], uri_of) -> None:
    """Exactly one record per case, the right error kinds, every decodable image annotated."""
    by_uri = {r.uri: r for r in records}
    assert len(records) == len(by_uri) == len(cases)
    for case in cases:
        record = by_uri[uri_of(case)]
        if case.expected_error:
            assert record.error is not None and record.error.kind == case.expected_error, case.name
            assert record.caption is None and record.tags is None
        else:
            assert record.error is None, (case.name, record.error)
            assert (record.image.width, record.image.height) == case.expected_size, case.name
            assert record.caption.text and record.caption.revision
            assert set(record.moderation.scores) == {"normal", "nsfw"}
            assert record.tags.labels and record.tags.labels[0].score >= record.tags.labels[-1].score
        assert record.signature == records[0].signature


def test_annotate_folder_writes_one_record_per_file_with_error_kinds(
    mixed_folder: tuple[Path, list[Case]], model_env: dict[str, str], tmp_path: Path
) -> None:
    folder, cases = mixed_folder
    out = tmp_path / "annotations.jsonl"
    result = run_cli("annotate", str(folder), "--tasks", "caption,moderation,tags", "--out", str(out), env=model_env)
    assert result.returncode == 0, result.stderr
    check_records(read_records(out), cases, lambda c: file_uri(folder / c.name))
    assert "annotated" in result.stderr and "truncated" in result.stderr  # the summary
    lines = out.read_text().splitlines()
    assert all(json.loads(line)["uri"] for line in lines)


@pytest.mark.slow
def test_annotate_s3_prefix_reads_through_the_s3_protocol(
    s3_env: str, bucket: str, model_env: dict[str, str], tmp_path: Path
) -> None:
    client = s3_client(s3_env)
    cases = write_mixed(tmp_path / "upload")
    for case in cases:
        client.put_object(Bucket=bucket, Key=f"photos/2026/{case.name}", Body=case.data)
    client.put_object(Bucket=bucket, Key="elsewhere/x.jpg", Body=cases[0].data)
    out = tmp_path / "s3.parquet"
    env = {**model_env, "IMAGEMILL_S3_ENDPOINT_URL": s3_env}
    result = run_cli("annotate", f"s3://{bucket}/photos/", "--out", str(out), "-q", env=env)
    assert result.returncode == 0, result.stderr
    records = read_records(out)
    check_records(records, cases, lambda c: f"s3://{bucket}/photos/2026/{c.name}")
    assert all(r.etag for r in records)


@pytest.mark.slow
def test_manifest_mixes_local_files_and_s3_objects_and_missing_ones(
    s3_env: str, bucket: str, model_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.fixtures.images import photo_jpeg

    s3_client(s3_env).put_object(Bucket=bucket, Key="a.jpg", Body=photo_jpeg(320, 240))
    (tmp_path / "local.jpg").write_bytes(photo_jpeg(200, 100, seed=2))
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"local.jpg\ns3://{bucket}/a.jpg\ns3://{bucket}/gone.jpg\nmissing.jpg\n")
    out = tmp_path / "out.jsonl"
    env = {**model_env, "IMAGEMILL_S3_ENDPOINT_URL": s3_env}
    result = run_cli("annotate", str(manifest), "--tasks", "moderation", "--out", str(out), "-q", env=env)
    assert result.returncode == 0, result.stderr
    records = read_records(out)
    kinds = [r.error.kind if r.error else None for r in records]
    assert kinds == [None, None, "not_found", "not_found"]
    assert records[0].moderation and records[0].caption is None and records[0].tags is None


def test_a_bad_source_is_one_clear_line_and_a_non_zero_exit(model_env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("annotate", str(tmp_path / "nope"), "--out", str(tmp_path / "o.jsonl"), env=model_env)
    assert result.returncode == 2
    assert "error:" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_task_is_a_usage_error(model_env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli("annotate", str(tmp_path), "--tasks", "caption,ocr", env=model_env)
    assert result.returncode == 2
    assert "unknown task ocr" in result.stderr


@pytest.mark.slow
def test_a_model_that_cannot_load_is_named(model_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "photo.jpg").write_bytes(b"x")
    env = {**model_env, "IMAGEMILL_CAPTION_MODEL": str(tmp_path / "no-such-model")}
    result = run_cli("annotate", str(tmp_path), "--tasks", "caption", "--out", str(tmp_path / "o.jsonl"), env=env)
    assert result.returncode == 3
    assert "cannot load the caption model" in result.stderr and "no-such-model" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.jsonl").exists()  # nothing written before the models were ready


@pytest.mark.slow
def test_hub_models_without_a_cache_say_how_to_get_them(model_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "photo.jpg").write_bytes(b"x")
    env = {**model_env, "IMAGEMILL_MODERATION_MODEL": "Falconsai/nsfw_image_detection", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("annotate", str(tmp_path), "--tasks", "moderation", "--out", str(tmp_path / "o.jsonl"), env=env)
    assert result.returncode == 3
    assert "imagemill models download" in result.stderr


@pytest.mark.slow
def test_models_download_skips_local_directories_and_fails_clearly_offline(
    model_env: dict[str, str], tmp_path: Path
) -> None:
    local = run_cli("models", "download", "--tasks", "caption", env=model_env)
    assert local.returncode == 0 and "local directory already" in local.stderr
    env = {**model_env, "IMAGEMILL_TAGS_MODEL": "openai/clip-vit-base-patch32", "HF_HOME": str(tmp_path / "hf")}
    offline = run_cli("models", "download", "--tasks", "tags", "--to", str(tmp_path / "m"), env=env)
    assert offline.returncode == 1
    assert "cannot download openai/clip-vit-base-patch32" in offline.stderr
    assert "Traceback" not in offline.stderr
