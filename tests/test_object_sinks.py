"""Chunk sinks: one S3 object or one file per chunk, replaced (never duplicated) on redelivery."""

import stat
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from imagemill.core.errors import ErrorKind, UserError
from imagemill.core.schemas import Caption, ImageInfo, Moderation, Record, RecordError, Tags, TagScore
from imagemill.core.settings import Settings
from imagemill.core.sinks.objects import DirectorySink, ObjectStoreSink, chunk_object_name
from tests.fixtures.s3 import s3_client


def record(uri: str, caption: str = "a dog") -> Record:
    return Record(
        uri=uri,
        etag="abc",
        bytes=123,
        image=ImageInfo(width=640, height=480, format="JPEG"),
        caption=Caption(text=caption, model="m1", revision="r1"),
        moderation=Moderation(flagged=False, scores={"nsfw": 0.01, "normal": 0.99}, model="m2"),
        tags=Tags(labels=[TagScore(tag="dog", score=0.31)], model="m3"),
        signature="sig",
        job_id="job-abc",
    )


def error_record() -> Record:
    return Record(uri="file:///x.jpg", error=RecordError(kind=ErrorKind.TRUNCATED, message="cut"), signature="sig")


def sink(endpoint: str, url: str) -> ObjectStoreSink:
    return ObjectStoreSink.from_url(url, Settings(s3_endpoint_url=endpoint))


def all_keys(endpoint: str, bucket: str) -> list[str]:
    listing = s3_client(endpoint).list_objects_v2(Bucket=bucket)
    return [entry["Key"] for entry in listing.get("Contents", [])]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_writing_the_same_chunk_twice_leaves_one_object_with_the_second_version(
    s3_endpoint: str, bucket: str, fmt: str
) -> None:
    out = sink(s3_endpoint, f"s3://{bucket}/out/?format={fmt}")
    out.write([record("s3://in/1.jpg", "first"), record("s3://in/2.jpg", "first")], "job-abc/000001")
    second = [record("s3://in/1.jpg", "second")]
    out.write(second, "job-abc/000001")
    assert all_keys(s3_endpoint, bucket) == [f"out/job-abc/000001.{fmt}"]
    assert out.read_all() == second


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_round_trip_equal_records(s3_endpoint: str, bucket: str, fmt: str) -> None:
    out = sink(s3_endpoint, f"s3://{bucket}/out/?format={fmt}")
    first, second = [record("s3://in/1.jpg"), error_record()], [record("s3://in/3.jpg", "a cat")]
    out.write(first, "job-abc/000001")
    out.write(second, "job-abc/000002")
    out.close()
    assert out.read_all() == first + second
    assert out.read_all("job-abc/000002") == second


@pytest.mark.parametrize(
    ("fmt", "content_type"), [("jsonl", "application/x-ndjson"), ("parquet", "application/vnd.apache.parquet")]
)
def test_objects_carry_the_content_type_of_their_format(
    s3_endpoint: str, bucket: str, fmt: str, content_type: str
) -> None:
    sink(s3_endpoint, f"s3://{bucket}/out?format={fmt}").write([record("s3://in/1.jpg")], "c")
    head = s3_client(s3_endpoint).head_object(Bucket=bucket, Key=f"out/c.{fmt}")
    assert head["ContentType"] == content_type


def test_an_empty_chunk_still_writes_an_object(s3_endpoint: str, bucket: str) -> None:
    out = sink(s3_endpoint, f"s3://{bucket}/out/?format=parquet")
    out.write([], "job-abc/000007")
    assert all_keys(s3_endpoint, bucket) == ["out/job-abc/000007.parquet"]
    assert out.read_all() == []


def test_the_object_key_is_deterministic_and_contains_the_chunk_name(s3_endpoint: str, bucket: str) -> None:
    url = f"s3://{bucket}/results/run1/"
    out = sink(s3_endpoint, url)
    assert out.key_for("job-abc/000042") == "results/run1/job-abc/000042.jsonl"
    # the same name again, from the same sink and from another one: the same literal key every time
    assert [out.key_for("job-abc/000042"), sink(s3_endpoint, url).key_for("job-abc/000042")] == [
        "results/run1/job-abc/000042.jsonl",
        "results/run1/job-abc/000042.jsonl",
    ]
    assert sink(s3_endpoint, f"{url}?format=parquet").key_for("job-abc/000043") == "results/run1/job-abc/000043.parquet"
    sink(s3_endpoint, url).write([record("s3://in/1.jpg")], "job-abc/000042")
    assert all_keys(s3_endpoint, bucket) == ["results/run1/job-abc/000042.jsonl"]


@pytest.mark.parametrize("url", ["s3://{b}/out", "s3://{b}/out/"])
def test_prefixes_with_and_without_trailing_slash_are_equivalent(s3_endpoint: str, bucket: str, url: str) -> None:
    out = sink(s3_endpoint, url.format(b=bucket))
    out.write([record("s3://in/1.jpg")], "c1")
    assert all_keys(s3_endpoint, bucket) == ["out/c1.jsonl"]
    assert out.prefix == "out/"


def test_a_bucket_without_prefix_writes_at_its_root(s3_endpoint: str, bucket: str) -> None:
    sink(s3_endpoint, f"s3://{bucket}").write([record("s3://in/1.jpg")], "c1")
    assert all_keys(s3_endpoint, bucket) == ["c1.jsonl"]


def test_read_all_skips_objects_that_are_not_chunks(s3_endpoint: str, bucket: str) -> None:
    out, records = sink(s3_endpoint, f"s3://{bucket}/out/"), [record("s3://in/1.jpg")]
    out.write(records, "c1")
    s3_client(s3_endpoint).put_object(Bucket=bucket, Key="out/_SUCCESS", Body=b"")
    assert out.read_all() == records


def test_read_all_pages_through_more_than_a_thousand_objects(s3_endpoint: str, bucket: str) -> None:
    client = s3_client(s3_endpoint)
    body = record("s3://in/1.jpg").model_dump_json().encode() + b"\n"
    with ThreadPoolExecutor(16) as pool:  # only to make the setup quick; the listing is what is tested
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"out/c{i:05d}.jsonl", Body=body), range(1005)))
    assert len(sink(s3_endpoint, f"s3://{bucket}/out/").read_all()) == 1005


@pytest.mark.parametrize(
    "chunk", ["../escape", "a/../../b", "..", "/abs", "", "a//b", "./a", "a/", "a\\b", "a\0b", "..\\x\0"]
)
def test_a_chunk_name_that_could_escape_the_prefix_is_refused(s3_endpoint: str, bucket: str, chunk: str) -> None:
    with pytest.raises(ValueError, match="chunk name"):
        sink(s3_endpoint, f"s3://{bucket}/out/").write([record("s3://in/1.jpg")], chunk)
    assert all_keys(s3_endpoint, bucket) == []


def test_a_chunk_name_with_dots_inside_a_segment_is_fine() -> None:
    assert chunk_object_name("job-1.2/000042..x", "jsonl") == "job-1.2/000042..x.jsonl"


@pytest.mark.parametrize("url", ["s3://b/out/?format=csv", "s3://b/out/?fmt=jsonl", "s3:///out/"])
def test_a_bad_sink_url_is_a_user_error(url: str) -> None:
    with pytest.raises(UserError):
        ObjectStoreSink.from_url(url)


def test_write_errors_propagate_for_the_task_to_retry(s3_endpoint: str) -> None:
    out = sink(s3_endpoint, "s3://no-such-bucket-imagemill/out/")
    with pytest.raises(Exception, match="NoSuchBucket"):
        out.write([record("s3://in/1.jpg")], "c1")


# the directory sink: the same names on a shared volume


def files_under(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def test_the_directory_sink_never_leaves_a_partial_file(tmp_path: Path) -> None:
    out = DirectorySink(tmp_path, "jsonl")
    records = [record(f"s3://in/{i}.jpg") for i in range(500)]
    for i in range(5):
        out.write(records, f"job-abc/{i:06d}")
    # no temporary files remain, and every chunk file holds its whole chunk
    assert files_under(tmp_path) == [f"job-abc/{i:06d}.jsonl" for i in range(5)]
    for i in range(5):
        content = (tmp_path / f"job-abc/{i:06d}.jsonl").read_bytes()
        assert content.endswith(b"\n") and content.count(b"\n") == 500
    assert out.read_all() == records * 5


def test_directory_sink_files_are_readable_by_others_and_writable_only_by_the_owner(tmp_path: Path) -> None:
    out = DirectorySink(tmp_path, "jsonl")
    out.write([], "job/part/c1")  # the folders a chunk name asks for are made
    assert stat.S_IMODE((tmp_path / "job" / "part" / "c1.jsonl").stat().st_mode) == 0o644  # rw-r--r--, never executable


def test_the_directory_sink_refuses_an_escaping_chunk_name(tmp_path: Path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    with pytest.raises(ValueError, match="chunk name"):
        DirectorySink(inner, "jsonl").write([record("s3://in/1.jpg")], "../escape")
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("scheme", ["http", "dir", "s3"])
def test_the_directory_sink_takes_only_local_file_urls(tmp_path: Path, scheme: str) -> None:
    with pytest.raises(UserError, match=r"expected file:///absolute/directory/$"):
        DirectorySink.from_url(f"{scheme}://{tmp_path}/")
    with pytest.raises(UserError, match=r"expected file:///absolute/directory/$"):
        DirectorySink.from_url(f"file://elsewhere{tmp_path}/")  # another host's disk is not ours to write
    with pytest.raises(UserError, match=r"^sink file://\[: expected file:///absolute/directory/$"):
        DirectorySink.from_url("file://[")
    assert DirectorySink.from_url(f"file://localhost{tmp_path}/?format=parquet").directory == tmp_path


def test_the_directory_sink_needs_an_existing_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        DirectorySink.from_url((tmp_path / "missing").as_uri() + "/")


@pytest.mark.parametrize(("newer", "older"), [("jsonl", "parquet"), ("parquet", "jsonl")])
def test_the_newest_record_of_a_uri_wins_across_chunks_of_either_format(tmp_path: Path, newer: str, older: str) -> None:
    """Parquet's times and JSON lines' ISO strings are compared on one clock (microseconds since 1970):
    a record an hour newer wins, whichever format either chunk has."""
    url = tmp_path.as_uri() + "/"
    then = datetime(2026, 1, 10, tzinfo=UTC)
    first = record("s3://b/x.jpg", "older").model_copy(update={"processed_at": then})
    second = record("s3://b/x.jpg", "newer").model_copy(update={"processed_at": then + timedelta(hours=1)})
    DirectorySink.from_url(f"{url}?format={older}").write([first], "job-abc/000001")
    DirectorySink.from_url(f"{url}?format={newer}").write([second], "job-abc/000002")
    (current,) = [r for batch in DirectorySink.from_url(url).read() for r in batch]
    assert current.caption is not None and current.caption.text == "newer"
