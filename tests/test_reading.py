"""Reading records back (`read_records`): files, PostgreSQL and object sinks, current set or history,
in bounded batches; a source that cannot be read is one UserError line."""

import gzip
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from imagemill.core.errors import UserError
from imagemill.core.schemas import Caption, ImageInfo, Record, Tags, TagScore
from imagemill.core.settings import Settings
from imagemill.core.sinks import read_records
from imagemill.core.sinks.files import open_file_sink
from imagemill.core.sinks.objects import DirectorySink, ObjectStoreSink
from imagemill.core.sinks.postgres import PostgresSink

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def record(uri: str, caption: str = "a dog", etag: str = "e1", signature: str = "sig-a", minutes: int = 0) -> Record:
    return Record(
        uri=uri,
        etag=etag,
        bytes=123,
        image=ImageInfo(width=64, height=48, format="JPEG"),
        caption=Caption(text=caption, model="m1"),
        tags=Tags(labels=[TagScore(tag="dog", score=0.5)], model="m3"),
        signature=signature,
        processed_at=T0 + timedelta(minutes=minutes),
    )


def everything(source: str, history: bool = False, batch_size: int = 4096) -> list[Record]:
    return [r for batch in read_records(source, history=history, batch_size=batch_size) for r in batch]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_file_is_read_in_batches_of_at_most_batch_size(tmp_path: Path, suffix: str) -> None:
    written = [record(f"file:///p/{i}.jpg", caption=f"c{i}") for i in range(10)]
    with open_file_sink(str(tmp_path / f"out{suffix}")) as writer:
        writer.write(written)
    sizes = [len(batch) for batch in read_records(str(tmp_path / f"out{suffix}"), batch_size=3)]
    assert sizes == [3, 3, 3, 1]
    assert everything(str(tmp_path / f"out{suffix}"), batch_size=3) == written


def test_a_gzipped_jsonl_file_is_read(tmp_path: Path) -> None:
    written = [record("file:///p/a.jpg"), record("file:///p/b.jpg")]
    path = tmp_path / "out.jsonl.gz"
    path.write_bytes(gzip.compress("".join(r.model_dump_json() + "\n" for r in written).encode()))
    assert everything(str(path)) == written


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("out.csv", b"uri\n", "expected a .jsonl/.jsonl.gz/.parquet file"),
        ("gone.jsonl", None, "no such file"),
        ("broken.parquet", b"PAR1 not really", "not a Parquet file"),
        ("bad.jsonl", b'{"uri": "x"}\n', "line 1 is not a record (signature: Field required)"),
    ],
)
def test_a_file_that_cannot_be_read_is_one_line(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match="^RECORDS .*" + message.replace("(", r"\(").replace(")", r"\)")) as caught:
        everything(str(path))
    assert "\n" not in str(caught.value)


def test_an_unknown_scheme_is_refused() -> None:
    with pytest.raises(UserError, match=r"expected a \.jsonl"):
        read_records("ftp://host/records.jsonl")


# -- PostgreSQL -------------------------------------------------------------------------------------


@pytest.fixture
def pg_records(pg_url: str) -> str:
    url = f"{pg_url}?table=read_{secrets.token_hex(4)}"
    with PostgresSink(url) as store:
        store.write(
            [
                record("s3://b/p/a.jpg", signature="sig-a", minutes=0),
                record("s3://b/p/a.jpg", signature="sig-b", minutes=5),  # a newer pipeline on the same image
                *(record(f"s3://b/p/{i:02d}.jpg") for i in range(7)),
            ]
        )
    return url


def test_postgresql_reads_the_current_view_unless_history_is_asked(pg_records: str) -> None:
    current = everything(pg_records, batch_size=2)
    assert len(current) == 8
    assert [r.signature for r in current if r.uri == "s3://b/p/a.jpg"] == ["sig-b"]
    history = everything(pg_records, history=True)
    assert len(history) == 9
    assert sorted(r.signature for r in history if r.uri == "s3://b/p/a.jpg") == ["sig-a", "sig-b"]


def test_postgresql_rows_written_while_reading_are_not_read(pg_records: str) -> None:
    batches = read_records(pg_records, history=True, batch_size=2)
    seen = list(next(batches))
    with PostgresSink(pg_records) as store:  # what retag does: new rows beside those it reads
        store.write([record("s3://b/p/zz.jpg"), record("s3://b/p/06.jpg", signature="sig-z", minutes=9)])
    seen += [r for batch in batches for r in batch]
    assert len(seen) == 9
    assert everything(pg_records)[-1].uri == "s3://b/p/zz.jpg"  # a later read sees them


def test_a_postgresql_database_without_the_table_is_one_line(pg_url: str) -> None:
    with pytest.raises(UserError, match=r"the database has no table nothing_here$"):
        read_records(f"{pg_url}?table=nothing_here")


# -- object sinks -----------------------------------------------------------------------------------


def two_jobs(sink: DirectorySink | ObjectStoreSink) -> None:
    """Job 1 annotates a, b, c; then a is replaced (new etag) and job 2 annotates a and b again."""
    sink.write([record("s3://in/a.jpg", "old a", etag="a1"), record("s3://in/b.jpg", "b", minutes=1)], "job-1/000000")
    sink.write([record("s3://in/c.jpg", "c", minutes=2)], "job-1/000001")
    sink.write(
        [record("s3://in/b.jpg", "b again", minutes=11), record("s3://in/a.jpg", "new a", etag="a2", minutes=10)],
        "job-2/000000",
    )


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_directory_sinks_current_set_is_the_newest_record_per_uri(tmp_path: Path, fmt: str) -> None:
    two_jobs(DirectorySink(tmp_path, fmt))
    current = {r.uri: (r.etag, r.caption.text if r.caption else None) for r in everything(f"file://{tmp_path}/")}
    assert current == {
        "s3://in/a.jpg": ("a2", "new a"),
        "s3://in/b.jpg": ("e1", "b again"),
        "s3://in/c.jpg": ("e1", "c"),
    }
    assert len(everything(f"file://{tmp_path}/", history=True)) == 5


def test_an_s3_sinks_current_set_and_history(s3_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEMILL_S3_ENDPOINT_URL", s3_endpoint)
    two_jobs(ObjectStoreSink.from_url(f"s3://{bucket}/out/?format=parquet", Settings(s3_endpoint_url=s3_endpoint)))
    current = everything(f"s3://{bucket}/out/", batch_size=2)
    assert sorted((r.uri, r.caption.text if r.caption else None) for r in current) == [
        ("s3://in/a.jpg", "new a"),
        ("s3://in/b.jpg", "b again"),
        ("s3://in/c.jpg", "c"),
    ]
    assert len(everything(f"s3://{bucket}/out/", history=True)) == 5


def test_an_empty_sink_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no record files under it"):
        read_records(f"file://{tmp_path}/")
