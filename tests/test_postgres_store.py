"""The PostgreSQL store on a real server: idempotent upserts, atomic chunks, bulk key checks, recovery."""

import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest
from psycopg import sql

from imagemill.core.errors import ErrorKind, UserError
from imagemill.core.redaction import redact_url
from imagemill.core.schemas import Caption, ImageInfo, Moderation, Record, Tags, TagScore
from imagemill.core.sinks import open_sink, postgres
from imagemill.core.sinks.postgres import SCHEMA_VERSION, PostgresSink, SchemaVersionError
from tests.fixtures.postgres import admin_connection, admin_url, fresh_database
from tests.fixtures.s3 import free_port


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresSink]:
    """A store on its own table, so tests sharing the session database never see each other's rows."""
    writer = PostgresSink(f"{pg_url}?table=t_{secrets.token_hex(4)}")
    yield writer
    writer.close()


def record(uri: str, **fields: object) -> Record:
    return Record.model_validate({"uri": uri, "signature": "sig", "job_id": "job-1", **fields})


def full_record(uri: str = "s3://bucket/a b/ü.jpg") -> Record:
    return Record(
        uri=uri,
        etag="abc",
        bytes=123,
        image=ImageInfo(width=640, height=480, format="JPEG"),
        caption=Caption(text="a dog on a 'sofa'; DROP TABLE x", model="m1", revision="r1"),
        moderation=Moderation(flagged=True, scores={"nsfw": 0.1, "normal": 0.123456789}, model="m2"),
        tags=Tags(labels=[TagScore(tag="dog", score=0.31)], model="m3"),
        signature="sig",
        job_id="job-typed",
    )


def table_rows(url: str, table: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        columns = "uri, etag, signature, job_id, flagged, caption, error_kind, processed_at"
        query = sql.SQL("SELECT " + columns + " FROM {} ORDER BY uri, etag, signature").format(sql.Identifier(table))
        return conn.execute(query).fetchall()


def test_records_with_no_etag_and_different_signatures_are_distinct_rows(store: PostgresSink, pg_url: str) -> None:
    store.write([record("file:///a.jpg", signature="s1"), record("file:///a.jpg", signature="s2")], "c1")
    store.write([record("file:///a.jpg", signature="s1")], "c2")  # same key again: still two rows
    assert store.count() == 2
    rows = table_rows(pg_url, store.table)
    assert [(row[1], row[2]) for row in rows] == [("", "s1"), ("", "s2")]
    assert {(r.etag, r.signature) for r in store.records()} == {(None, "s1"), (None, "s2")}


def test_nul_characters_in_outputs_are_dropped_instead_of_failing_the_chunk_forever(store: PostgresSink) -> None:
    store.write(
        [
            record("file:///a.jpg", caption={"text": "bad\x00caption", "model": "m"}),
            record("file:///b.jpg", error={"kind": "truncated", "message": "bad\x00message"}),
        ],
        "c",
    )
    by_uri = {r.uri: r for r in store.records()}
    assert by_uri["file:///a.jpg"].caption.text == "badcaption"
    assert by_uri["file:///b.jpg"].error.message == "badmessage"


def test_typed_columns_match_the_record_and_jsonb_round_trips_to_an_equal_record(
    store: PostgresSink, pg_url: str
) -> None:
    written = [
        full_record("file:///1-flagged.jpg"),
        record("file:///2-clean.jpg", moderation={"flagged": False, "scores": {"nsfw": 0.0}, "model": "m"}),
        # a prompted caption (Florence-2's task token) keeps its prompt in the record's JSONB
        record("file:///3-no-moderation.jpg", caption={"text": "just a caption", "model": "m", "prompt": "<OCR>"}),
        record("file:///4-error.jpg", error={"kind": "not_an_image", "message": "it is a PDF"}, job_id=None),
        record("file:///5-old.jpg", processed_at=datetime(2001, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)),
    ]
    store.write(written, "c")
    rows = table_rows(pg_url, store.table)
    assert [row[3:7] for row in rows] == [
        ("job-typed", True, "a dog on a 'sofa'; DROP TABLE x", None),
        ("job-1", False, None, None),
        ("job-1", None, "just a caption", None),
        (None, None, None, "not_an_image"),
        ("job-1", None, None, None),
    ]
    assert [row[7] for row in rows] == [r.processed_at for r in written]
    assert rows[4][7] == datetime(2001, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
    assert store.records() == written
    assert store.records("job-typed") == written[:1]
    assert store.count("job-1") == 3


def test_existing_keys_returns_only_keys_with_error_free_records_in_bulk(
    store: PostgresSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = []
    for i in range(2500):
        etag = None if i % 3 == 0 else f"etag-{i}"
        error = {"kind": ErrorKind.FETCH_FAILED, "message": "timeout"} if i % 7 == 0 else None
        records.append(record(f"s3://b/{i:05}.jpg", etag=etag, error=error))
    for start in range(0, len(records), 500):
        store.write(records[start : start + 500], f"job/{start}")
    expected = {r.key for r in records if r.error is None}
    unknown = {(f"s3://b/{i:05}.jpg", "other-etag", "sig") for i in range(1, 50, 3)}
    unknown |= {("s3://b/00001.jpg", "etag-1", "other-signature"), ("s3://b/nope.jpg", None, "sig")}

    statements: list[object] = []
    real_execute = psycopg.Cursor.execute

    def counting_execute(self: psycopg.Cursor, query: object, *args: object, **kwargs: object) -> object:
        statements.append(query)
        return real_execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", counting_execute)
    found = store.existing_keys([r.key for r in records] + sorted(unknown, key=str))
    assert found == expected
    assert len(expected) == 2142 and ("s3://b/00003.jpg", None, "sig") in found
    assert len(statements) == 3  # 2,520 keys, 1,000 per query
    assert store.existing_keys([]) == set()


def test_a_single_stored_key_is_found(store: PostgresSink) -> None:
    done = record("s3://b/only.jpg", etag="e")
    store.write([done], "job/0")
    assert store.existing_keys([done.key]) == {done.key}
    assert store.existing_keys([done.key, done.key]) == {done.key}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "imagemill_meta has schema_version None, expected 3"),
        ("0", "imagemill_meta has schema_version '0', expected 3"),
        ("three", "imagemill_meta has schema_version 'three', expected 3"),
        ("4", "database schema version 4 is newer than this imagemill knows (3); upgrade imagemill"),
    ],
)
def test_a_schema_version_this_imagemill_does_not_write_is_refused_naming_it(value: str | None, message: str) -> None:
    with pytest.raises(SchemaVersionError) as refused:
        postgres._check_version(value, "postgresql://db")
    assert str(refused.value) == f"postgresql://db: {message}"


def test_two_stores_creating_tables_concurrently_both_succeed() -> None:
    with fresh_database(admin_url()) as url:
        start = threading.Barrier(6)
        errors: list[BaseException] = []

        def first_write(n: int) -> None:
            writer = PostgresSink(url)  # the default table: every thread races for the same DDL
            try:
                start.wait()
                writer.write([record(f"file:///{n}.jpg")], f"c{n}")
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
                errors.append(exc)
            finally:
                writer.close()

        threads = [threading.Thread(target=first_write, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert PostgresSink(url).count() == 6
        with psycopg.connect(url) as conn:
            meta = conn.execute("SELECT key, value FROM imagemill_meta").fetchall()
            assert meta == [("schema_version", "3")]  # this imagemill's schema: a new version is a deliberate change
            query = "SELECT indexname FROM pg_indexes WHERE tablename = 'imagemill_records'"
            indexes = {row[0] for row in conn.execute(query)}
        assert {f"imagemill_records_{c}_idx" for c in ("job_id", "error_kind", "flagged")} <= indexes


def test_setting_up_the_tables_waits_for_the_lock_every_version_takes() -> None:
    """Old and new imagemills set up one at a time: both take the advisory lock "imgmill" (its
    ASCII), a key no release may change."""
    with fresh_database(admin_url()) as url, psycopg.connect(url) as other:
        done = threading.Event()

        def first_write() -> None:
            with PostgresSink(url) as writer:
                writer.write([record("file:///1.jpg")], "c1")
            done.set()

        with other.transaction():
            other.execute("SELECT pg_advisory_xact_lock(%s)", (int.from_bytes(b"imgmill"),))
            thread = threading.Thread(target=first_write)
            thread.start()
            assert not done.wait(1.0), "the set-up did not wait for the lock"
        thread.join(60)
        assert done.is_set()


def test_a_database_with_a_newer_schema_version_is_refused_clearly() -> None:
    with fresh_database(admin_url()) as url:
        PostgresSink(url).count()  # creates the tables at this version
        newer = SCHEMA_VERSION + 1
        with psycopg.connect(url) as conn:
            conn.execute("UPDATE imagemill_meta SET value = %s WHERE key = 'schema_version'", (str(newer),))
        with pytest.raises(SchemaVersionError, match=f"schema version {newer} is newer"):
            PostgresSink(url).write([record("file:///a.jpg")], "c")


def test_a_bad_url_is_a_user_error_through_open_writer_too() -> None:
    with pytest.raises(UserError, match=r"alice:\*\*\*@"):
        open_sink("postgres://alice:s3cretpw@127.0.0.1/db?bogus=1")


def test_an_empty_write_is_a_no_op_that_does_not_even_connect() -> None:
    writer = PostgresSink(f"postgresql://alice:pw@127.0.0.1:{free_port()}/db")
    writer.write([], "c")
    writer.close()


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url("postgresql://user:pa:ss@host:5432/db?table=t") == "postgresql://user:***@host:5432/db?table=t"
    assert redact_url("s3://key:secret@bucket/prefix/") == "s3://key:***@bucket/prefix/"
    assert redact_url("postgresql://user@host/db") == "postgresql://user@host/db"
    assert redact_url("postgresql://host:5432/db") == "postgresql://host:5432/db"
    assert redact_url("postgresql://u:a/b?c@host/db") == "postgresql://u:***@host/db"
    assert redact_url("postgresql://host/db?user=u&password=secret") == "postgresql://host/db?user=u&password=***"


def test_the_store_recovers_after_the_server_kills_its_connection(pg_url: str) -> None:
    app = f"imagemill_kill_{secrets.token_hex(4)}"  # other query parameters survive the ?table= strip
    writer = PostgresSink(f"{pg_url}?application_name={app}&table=t_kill_{secrets.token_hex(4)}")
    writer.write([record("file:///before.jpg")], "c0")
    with admin_connection(admin_url()) as admin:
        query = "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
        pids = [row[0] for row in admin.execute(query, (app,))]
        assert len(pids) == 1
        admin.execute("SELECT pg_terminate_backend(%s)", (pids[0],))
        deadline = time.monotonic() + 10
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pids[0],)).fetchone():
            assert time.monotonic() < deadline, "the backend did not exit"
            time.sleep(0.05)

    chunk = [record(f"file:///after-{i}.jpg") for i in range(3)]
    with pytest.raises(psycopg.OperationalError):
        writer.write(chunk, "c1")  # not silently lost: the caller sees it and retries
    writer.write(chunk, "c1")
    assert writer.count() == 4
    writer.close()


def test_a_connection_failure_after_first_use_is_an_operational_error_the_caller_can_retry() -> None:
    with fresh_database(admin_url()) as url:
        writer = PostgresSink(url)
        writer.write([record("file:///a.jpg")], "c0")
        with admin_connection(admin_url()) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(url.rsplit("/", 1)[1])))
        # the database worked a moment ago: failing now is transient (a failover), not the user's URL
        for _ in range(2):  # the dead socket, then the refused reconnect
            with pytest.raises(psycopg.OperationalError):
                writer.write([record("file:///b.jpg")], "c1")
        writer.close()


def test_processed_at_keeps_its_instant_across_time_zones(store: PostgresSink) -> None:
    local = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone(timedelta(hours=5)))
    store.write([record("file:///tz.jpg", processed_at=local)], "c")
    assert store.records()[0].processed_at == local


def test_a_store_block_closes_its_connection_whether_the_block_completes_or_fails(pg_url: str) -> None:
    app = f"imagemill_with_{secrets.token_hex(4)}"
    url = f"{pg_url}?application_name={app}&table=t_with_{secrets.token_hex(4)}"

    def backends() -> int:
        deadline = time.monotonic() + 10
        with admin_connection(admin_url()) as admin:
            while True:  # a closed connection's backend exits a moment after the client hangs up
                row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,))
                count = int(row.fetchone()[0])
                if count == 0 or time.monotonic() > deadline:
                    return count
                time.sleep(0.05)

    with open_sink(url) as store:
        store.write([record("file:///a.jpg")], "c0")
        assert isinstance(store, PostgresSink) and store.count() == 1
    assert backends() == 0

    def failing_block() -> None:
        with open_sink(url) as store:
            store.write([record("file:///b.jpg")], "c1")
            raise RuntimeError("the run failed")

    with pytest.raises(RuntimeError, match="the run failed"):
        failing_block()
    assert backends() == 0
    with PostgresSink(url) as store:
        assert store.count() == 2  # each chunk was committed when written
