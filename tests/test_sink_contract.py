"""The sink contract, shown for every sink: the local output file (JSONL, Parquet), a directory of
chunk files, S3 chunk objects, S3 object tags and PostgreSQL.

- A unit of work written twice leaves one copy of each record, the second's (a chunk redelivered to
  another worker; for the local file, a second run over the same target).
- A unit of work that fails leaves nothing of itself: the sink holds what it held before.
- `check()` passes a usable sink; an unusable one is refused, at opening or by `check()`, in one
  line that names it without its password.

Each sink is a `Case` below: how to write a unit to it, how to make its write fail, and how to read
what it holds. What only one sink does (Parquet row groups, tag limits, listings) is tested beside it.
"""

import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from botocore.exceptions import ClientError
from psycopg import sql

from imagemill.core.errors import ErrorKind, UserError
from imagemill.core.schemas import Caption, ImageInfo, Moderation, Record, RecordError, Tags, TagScore
from imagemill.core.settings import Settings
from imagemill.core.sinks import Sink, open_file_sink, open_sink
from imagemill.core.sinks.files import read_records
from imagemill.core.sinks.objects import DirectorySink, ObjectStoreSink
from imagemill.core.sinks.postgres import PostgresSink
from imagemill.core.sinks.s3tags import DEFAULT_PREFIX, ObjectTagsSink, merge_tags
from tests.fixtures.faulty_s3 import faulty_proxy
from tests.fixtures.s3 import free_port, s3_client

CHUNK = "job-abc/000001"
USER_TAGS = {"owner": "alice"}
# (make the sink, what its refusal must say, what it must not say)
Unusable = tuple[Callable[[], Sink], str, tuple[str, ...]]


def unit(uri: Callable[[int], str], version: str) -> list[Record]:
    """One chunk's records in one of two versions: five annotated images and one error record."""
    first = version == "first"
    job = "job-1" if first else "job-2"
    annotated = [
        Record(
            uri=uri(i),
            etag=f"e{i}",
            bytes=123,
            image=ImageInfo(width=640, height=480, format="JPEG"),
            caption=Caption(text=version, model="m1", revision="r1"),
            moderation=Moderation(flagged=first, scores={"nsfw": 0.9 if first else 0.01, "normal": 0.5}, model="m2"),
            tags=Tags(labels=[TagScore(tag="dog" if first else "cat", score=0.31)], model="m3"),
            signature="sig",
            job_id=job,
        )
        for i in range(5)
    ]
    failed = Record(
        uri=uri(5), etag="e5", error=RecordError(kind=ErrorKind.TRUNCATED, message=f"cut ({version})"), signature="sig"
    )
    return [*annotated, failed.model_copy(update={"job_id": job})]


def files_under(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


class Case:
    """One sink under the contract."""

    def uri(self, i: int) -> str:
        return f"file:///p/{i}.jpg"

    def write(self, records: list[Record]) -> None:
        """One unit of work, written and closed."""
        raise NotImplementedError

    def fail(self, records: list[Record]) -> None:
        """One unit of work whose writing fails (the failure is asserted here)."""
        raise NotImplementedError

    def assert_holds_only(self, records: list[Record]) -> None:
        """The sink holds `records`, one copy each, and nothing else."""
        raise NotImplementedError

    @contextmanager
    def usable(self) -> Iterator[Sink]:
        raise NotImplementedError
        yield

    def unusable(self) -> list[Unusable]:
        raise NotImplementedError


class LocalFile(Case):
    """A local run's `--out` file; its unit of work is the run, which replaces the file when it completes."""

    def __init__(self, tmp_path: Path, fmt: str) -> None:
        self.folder = tmp_path
        self.target = tmp_path / f"out.{fmt}"
        self.fmt = fmt

    def write(self, records: list[Record]) -> None:
        with open_file_sink(str(self.target)) as sink:
            sink.write(records[:2])
            sink.write(records[2:])

    def fail(self, records: list[Record]) -> None:
        before = self.target.read_bytes()
        for interrupt in (RuntimeError("model crashed"), KeyboardInterrupt()):

            def interrupted_run(interrupt: BaseException = interrupt) -> None:
                with open_file_sink(str(self.target)) as sink:
                    sink.write(records)
                    raise interrupt

            with pytest.raises(type(interrupt)):
                interrupted_run()
            assert self.target.read_bytes() == before
            self._assert_partial_holds(self.folder / f".out.{self.fmt}.partial", records)
        # aborted by hand: it says where what was written went
        sink = open_file_sink(str(self.target))
        sink.write(records)
        partial = sink.abort()
        assert self.target.read_bytes() == before
        assert partial == sink.partial and partial.exists()
        self._assert_partial_holds(partial, records)

    def _assert_partial_holds(self, partial: Path, records: list[Record]) -> None:
        named = partial.rename(partial.with_name(f"partial.{self.fmt}"))  # a name read_records knows the format of
        assert read_records(named) == records
        named.unlink()

    def assert_holds_only(self, records: list[Record]) -> None:
        assert read_records(self.target) == records
        assert files_under(self.folder) == [self.target.name]  # nothing beside it

    @contextmanager
    def usable(self) -> Iterator[Sink]:
        with open_sink(str(self.target)) as sink:
            yield sink

    def unusable(self) -> list[Unusable]:
        return [
            (lambda: open_sink(str(self.folder / "out.csv")), "must end in .jsonl or .parquet", ()),
            (lambda: open_sink(str(self.folder / "missing" / "out.jsonl")), "does not exist", ()),
        ]


class Directory(Case):
    """A directory on a shared volume, one file per chunk (file:///dir/)."""

    def __init__(self, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = tmp_path / "out"
        self.root.mkdir()
        self.fmt = fmt
        self.url = f"{self.root.as_uri()}/?format={fmt}"
        self.monkeypatch = monkeypatch
        self.missing = tmp_path / "missing"

    def uri(self, i: int) -> str:
        return f"s3://in/{i}.jpg"

    def write(self, records: list[Record]) -> None:
        with open_sink(self.url) as sink:
            sink.write(records, CHUNK)

    def fail(self, records: list[Record]) -> None:
        def disk_full(*args: object) -> None:
            raise OSError("disk full")

        with self.monkeypatch.context() as patch:
            patch.setattr(os, "fsync", disk_full)
            with pytest.raises(OSError, match="disk full"):
                self.write(records)

    def assert_holds_only(self, records: list[Record]) -> None:
        assert files_under(self.root) == [f"{CHUNK}.{self.fmt}"]  # one file, no temporary file beside it
        assert DirectorySink.from_url(self.url).read_all() == records

    @contextmanager
    def usable(self) -> Iterator[Sink]:
        with open_sink(self.url) as sink:
            yield sink

    def unusable(self) -> list[Unusable]:
        return [
            (lambda: open_sink(f"{self.missing.as_uri()}/"), "does not exist", ()),
            (lambda: open_sink("file://otherhost/dir/"), "expected file:///absolute/directory/", ()),
        ]


class S3Objects(Case):
    """One S3 object per chunk (s3://bucket/prefix/)."""

    def __init__(self, endpoint: str, bucket: str, fmt: str) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.fmt = fmt
        self.url = f"s3://{bucket}/out/?format={fmt}"

    def uri(self, i: int) -> str:
        return f"s3://in/{i}.jpg"

    def write(self, records: list[Record], endpoint: str | None = None, attempts: int = 8) -> None:
        settings = Settings(s3_endpoint_url=endpoint or self.endpoint, s3_max_attempts=attempts)
        with ObjectStoreSink.from_url(self.url, settings) as sink:
            sink.write(records, CHUNK)

    def fail(self, records: list[Record]) -> None:
        with faulty_proxy(self.endpoint) as proxy:
            proxy.add_rule("PUT", CHUNK, status=500, code="InternalError")
            with pytest.raises(ClientError, match="InternalError"):
                self.write(records, proxy.url, attempts=1)

    def assert_holds_only(self, records: list[Record]) -> None:
        listing = s3_client(self.endpoint).list_objects_v2(Bucket=self.bucket)
        assert [entry["Key"] for entry in listing.get("Contents", [])] == [f"out/{CHUNK}.{self.fmt}"]
        assert ObjectStoreSink.from_url(self.url, Settings(s3_endpoint_url=self.endpoint)).read_all() == records

    @contextmanager
    def usable(self) -> Iterator[Sink]:
        with open_sink(self.url) as sink:  # IMAGEMILL_S3_ENDPOINT_URL: the test server
            yield sink

    def unusable(self) -> list[Unusable]:
        return [(lambda: open_sink("s3://no-such-bucket-imagemill/out/"), "cannot use the bucket", ())]


class S3Tags(Case):
    """Results as tags on each record's own S3 object (s3tags://): one tag set per object, the
    user's own tags kept; a record's write merges onto what its object carried."""

    def __init__(self, endpoint: str, bucket: str) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.written: list[list[Record]] = []  # the units written, to say what each object carries
        client = s3_client(endpoint)
        tagging = "&".join(f"{key}={value}" for key, value in USER_TAGS.items())
        for i in range(6):
            client.put_object(Bucket=bucket, Key=f"photos/{i}.jpg", Body=b"jpeg", Tagging=tagging)

    def uri(self, i: int) -> str:
        return f"s3://{self.bucket}/photos/{i}.jpg"

    def write(self, records: list[Record], endpoint: str | None = None, attempts: int = 8) -> None:
        settings = Settings(s3_endpoint_url=endpoint or self.endpoint, s3_max_attempts=attempts)
        with ObjectTagsSink.from_url("s3tags://", settings) as sink:
            sink.write(records, CHUNK)
        self.written.append(records)

    def fail(self, records: list[Record]) -> None:
        with faulty_proxy(self.endpoint) as proxy:
            proxy.add_rule("PUT", "photos/", query_contains="tagging", status=500, code="InternalError")
            with pytest.raises(ClientError, match="InternalError"):
                self.write(records, proxy.url, attempts=1)  # raises before it is counted as written

    def assert_holds_only(self, records: list[Record]) -> None:
        assert records == self.written[-1]
        client = s3_client(self.endpoint)
        for i in range(6):
            expected = dict(USER_TAGS)
            for written in self.written:  # each write merges onto what the object carried
                expected = merge_tags(expected, written[i], DEFAULT_PREFIX)[0]
            tag_set = client.get_object_tagging(Bucket=self.bucket, Key=f"photos/{i}.jpg")["TagSet"]
            tags = {tag["Key"]: tag["Value"] for tag in tag_set}
            assert tags == expected
            assert len(tags) == len(tag_set)  # one value per tag: no copy of an earlier write's
            if records[i].moderation is not None:  # the last write's results show
                assert tags[f"{DEFAULT_PREFIX}flagged"] == str(records[i].moderation.flagged).lower()

    @contextmanager
    def usable(self) -> Iterator[Sink]:
        with open_sink("s3tags://") as sink:  # IMAGEMILL_S3_ENDPOINT_URL: the test server
            yield sink

    def unusable(self) -> list[Unusable]:
        unreachable = Settings(s3_endpoint_url="http://127.0.0.1:1", s3_max_attempts=1)
        return [(lambda: ObjectTagsSink(settings=unreachable), "cannot reach S3", ())]


class Postgres(Case):
    """One upserted row per record key, one transaction per chunk (postgresql://…), on a table of its own."""

    def __init__(self, pg_url: str) -> None:
        self.pg_url = pg_url
        self.table = f"t_{secrets.token_hex(4)}"
        self.url = f"{pg_url}?table={self.table}"

    def write(self, records: list[Record]) -> None:
        with PostgresSink(self.url) as sink:
            sink.write(records, CHUNK)

    def fail(self, records: list[Record]) -> None:
        bad = list(records)
        bad[2] = bad[2].model_copy(update={"uri": "file:///p/2\x00.jpg"})  # text cannot hold NUL: the row is refused
        sink = PostgresSink(self.url)
        held = sink.count()
        with pytest.raises(psycopg.DataError):
            sink.write(bad, CHUNK)
        # nothing of the chunk, not even its first two rows; and the connection is still usable
        assert sink.count() == held
        sink.close()

    def assert_holds_only(self, records: list[Record]) -> None:
        job = records[0].job_id
        with PostgresSink(self.url) as sink:
            assert sink.count() == len(records)
            assert sink.count(job) == len(records) and sink.count("job-1" if job == "job-2" else "job-2") == 0
            assert sorted(sink.records(), key=lambda r: r.uri) == sorted(records, key=lambda r: r.uri)
        with psycopg.connect(self.pg_url) as conn:
            query = sql.SQL("SELECT caption FROM {}").format(sql.Identifier(self.table))
            captions = {row[0] for row in conn.execute(query).fetchall()}
        assert captions == {r.caption.text if r.caption else None for r in records}  # the typed column too

    @contextmanager
    def usable(self) -> Iterator[Sink]:
        with open_sink(self.url) as sink:
            yield sink

    def unusable(self) -> list[Unusable]:
        hidden = ("s3cret", "cret+pw")
        urls = [
            f"postgresql://alice:s3cretpw@127.0.0.1:{free_port()}/db",  # nothing listens there
            "postgresql://alice:s3cretpw@127.0.0.1:notaport/db",
            "postgresql://alice:s3cretpw@[::1/db",  # libpq quotes the whole URL in this one
            "postgresql://alice:s3cretpw@127.0.0.1/db?bogus=1",
            "postgresql://alice:s3/cret+pw@127.0.0.1/db",  # unencoded `/`: libpq splits the password
            f"postgresql://alice:s3cretpw@127.0.0.1:{free_port()}/db?table=bad-name",
        ]
        return [((lambda url=url: PostgresSink(url)), "alice:***@", hidden) for url in urls]


CASES = [
    "local_jsonl",
    "local_parquet",
    "directory_jsonl",
    "directory_parquet",
    "s3_jsonl",
    "s3_parquet",
    "s3tags",
    pytest.param("postgresql", marks=pytest.mark.slow),  # a database server
]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    name: str = request.param
    kind, _, fmt = name.partition("_")
    if kind == "local":
        return LocalFile(tmp_path, fmt)
    if kind == "directory":
        return Directory(tmp_path, fmt, request.getfixturevalue("monkeypatch"))
    if kind == "postgresql":
        return Postgres(request.getfixturevalue("pg_url"))
    endpoint = request.getfixturevalue("s3_env")  # the sinks opened by URL read IMAGEMILL_S3_ENDPOINT_URL
    bucket = request.getfixturevalue("bucket")
    return S3Objects(endpoint, bucket, fmt) if kind == "s3" else S3Tags(endpoint, bucket)


def test_a_unit_of_work_written_twice_leaves_one_copy_of_each_record_the_second(case: Case) -> None:
    case.write(unit(case.uri, "first"))
    second = unit(case.uri, "second")
    case.write(second)
    case.assert_holds_only(second)


def test_a_unit_of_work_that_fails_leaves_nothing_of_itself(case: Case) -> None:
    before = unit(case.uri, "first")
    case.write(before)
    case.fail(unit(case.uri, "second"))
    case.assert_holds_only(before)


def test_check_passes_a_usable_sink_and_refuses_an_unusable_one_in_one_line(case: Case) -> None:
    with case.usable() as sink:
        sink.check()
    for make, shown, hidden in case.unusable():
        with pytest.raises(UserError) as caught:
            make().check()
        message = str(caught.value)
        assert shown in message and "\n" not in message, message
        assert not any(secret in message for secret in hidden), message
        # no chained driver exception either: some of those quote the URL, password and all
        assert caught.value.__cause__ is None
        assert caught.value.__context__ is None or caught.value.__suppress_context__
