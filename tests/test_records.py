"""The record schema and its files: only asked tasks appear, JSONL and Parquet round-trip."""

import json
from pathlib import Path

import pytest

from imagemill.core.errors import ErrorKind, UserError
from imagemill.core.schemas import Caption, ImageInfo, ModelOutput, Moderation, Record, RecordError, Tags, TagScore
from imagemill.core.settings import Settings
from imagemill.core.sinks import open_sink
from imagemill.core.sinks.files import read_records
from imagemill.core.tasks import DEFAULT_TASKS, TASKS, Task, parse_tasks


def full_record() -> Record:
    return Record(
        uri="s3://bucket/a b/ü.jpg",
        etag="abc",
        bytes=123,
        image=ImageInfo(width=640, height=480, format="JPEG"),
        caption=Caption(text="a dog", model="m1", revision="r1"),
        moderation=Moderation(flagged=False, scores={"nsfw": 0.01, "normal": 0.99}, model="m2"),
        tags=Tags(labels=[TagScore(tag="dog", score=0.31)], model="m3"),
        signature="sig",
    )


def error_record() -> Record:
    return Record(uri="file:///x.jpg", error=RecordError(kind=ErrorKind.TRUNCATED, message="cut"), signature="sig")


def test_tasks_not_asked_for_are_absent_and_error_is_null() -> None:
    data = json.loads(
        Record(uri="file:///a.jpg", caption=Caption(text="hi", model="m"), signature="s").model_dump_json()
    )
    assert "caption" in data and "moderation" not in data and "tags" not in data
    assert data["error"] is None
    assert data["processed_at"].endswith("Z")


def test_error_record_names_its_kind() -> None:
    data = json.loads(error_record().model_dump_json())
    assert data["error"] == {"kind": "truncated", "message": "cut"}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_writers_round_trip_every_field(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"out{suffix}"
    records = [full_record(), error_record()]
    writer = open_sink(str(path))
    writer.write(records)
    writer.close()
    assert read_records(path) == records


def test_writer_refuses_an_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"\.jsonl or \.parquet"):
        open_sink(str(tmp_path / "out.csv"))


def test_parse_tasks_orders_and_rejects() -> None:
    assert parse_tasks("tags,caption") == (Task.CAPTION, Task.TAGS)
    with pytest.raises(ValueError, match="unknown task ocr"):
        parse_tasks("caption,ocr")


@pytest.mark.parametrize("task", list(Task))
def test_every_task_has_one_row_naming_its_record_field_output_type_and_settings(task: Task) -> None:
    spec = TASKS[task]
    output = spec.output_type()
    assert issubclass(output, ModelOutput) and output.COLUMNS
    assert Record.model_fields[spec.field].annotation == output | None  # the record holds it under its field
    assert {spec.model_setting, spec.revision_setting} <= set(Settings.model_fields)
    assert spec.model_variable == f"IMAGEMILL_{spec.model_setting.upper()}"


def test_the_embedding_is_the_tags_models_and_asked_for_by_name() -> None:
    settings = Settings(tags_model="org/clip", tags_revision="abc", model_revision="old")
    assert settings.model(Task.EMBEDDING) == "org/clip" and settings.revision(Task.EMBEDDING) == "abc"
    assert TASKS[Task.EMBEDDING].model_variable == "IMAGEMILL_TAGS_MODEL"
    assert DEFAULT_TASKS == (Task.CAPTION, Task.MODERATION, Task.TAGS)
