"""The current records: the PostgreSQL table keeps history, `imagemill_current` says what is true now.

A complete listing of a prefix marks the records of objects it no longer lists (`deleted_at`) and
of versions it no longer shows (`superseded_at`); an incomplete listing or a manifest marks nothing.
"""

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from imagemill.core.errors import SourceError
from imagemill.core.jobs import JobRegistry
from imagemill.core.schemas import ImageRef, Record
from imagemill.core.settings import Settings
from imagemill.core.sinks import ListingMarks, MarksDeleted, open_sink
from imagemill.core.sinks.postgres import SCHEMA_VERSION, PostgresSink, current_view, like_prefix
from imagemill.core.tasks import Task
from imagemill.pipeline.sources import PrefixSource
from imagemill.producer.submit import Submission
from tests.fixtures.cli import run_cli
from tests.fixtures.distributed import submitted, upload_photos
from tests.fixtures.images import photo_jpeg
from tests.fixtures.postgres import admin_url, fresh_database
from tests.fixtures.s3 import s3_client
from tests.fixtures.workers import start_worker

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def record(uri: str, etag: str = "e1", signature: str = "sig-a", minutes: int = 0, **fields: object) -> Record:
    return Record.model_validate(
        {
            "uri": uri,
            "etag": etag,
            "signature": signature,
            "job_id": "job",
            "processed_at": T0 + timedelta(minutes=minutes),
            **fields,
        }
    )


def refs(*pairs: tuple[str, str]) -> list[ImageRef]:
    return [ImageRef(uri=uri, etag=etag) for uri, etag in pairs]


def listed(store: PostgresSink, prefix: str, items: list[ImageRef]) -> ListingMarks | None:
    """Follow a complete listing of `prefix` that yields `items`, and mark."""
    with store.listing(prefix) as listing:
        assert list(listing.record(iter(items))) == items
        return listing.finish()


def current(store: PostgresSink, url: str) -> dict[str, tuple[str, str]]:
    """uri -> (etag, signature) of the view."""
    query = sql.SQL("SELECT uri, etag, signature FROM {}").format(sql.Identifier(store.view))
    with psycopg.connect(url) as conn:
        return {uri: (etag, signature) for uri, etag, signature in conn.execute(query)}


def marked(store: PostgresSink, url: str) -> dict[tuple[str, str, str], tuple[bool, bool]]:
    """(uri, etag, signature) -> (deleted, superseded) of every row of the table."""
    query = sql.SQL("SELECT uri, etag, signature, deleted_at IS NOT NULL, superseded_at IS NOT NULL FROM {}").format(
        sql.Identifier(store.table)
    )
    with psycopg.connect(url) as conn:
        return {(u, e, s): (d, r) for u, e, s, d, r in conn.execute(query)}


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresSink]:
    """A store on its own table, so tests sharing the session database never see each other's rows."""
    with PostgresSink(f"{pg_url}?table=t_{secrets.token_hex(4)}") as writer:
        yield writer


# -- names and patterns (no services) ----------------------------------------------------------


def test_the_view_is_named_after_the_table() -> None:
    assert current_view("imagemill_records") == "imagemill_current"
    assert current_view("photos") == "photos_current"
    assert PostgresSink("postgresql://h/db?table=photos").view == "photos_current"


def test_a_prefix_pattern_escapes_like_wildcards() -> None:
    assert like_prefix("s3://b/100%_done\\x/") == "s3://b/100\\%\\_done\\\\x/%"


def test_only_postgresql_marks_deletions(tmp_path: Path) -> None:
    assert isinstance(PostgresSink("postgresql://h/db"), MarksDeleted)
    for sink in (f"file://{tmp_path}/", "s3://bucket/prefix/"):
        assert not isinstance(open_sink(sink), MarksDeleted)


# -- the view and the marks, on the store --------------------------------------------------------


def test_the_view_has_one_row_per_uri_with_the_table_columns(store: PostgresSink, pg_url: str) -> None:
    store.write([record("s3://b/p/a.jpg", signature="sig-a", minutes=0)], "c1")
    store.write([record("s3://b/p/a.jpg", signature="sig-b", minutes=5)], "c2")  # a newer pipeline
    store.write([record("s3://b/p/b.jpg", moderation={"model": "m", "flagged": True, "scores": {"nsfw": 0.9}})], "c3")
    assert current(store, pg_url) == {"s3://b/p/a.jpg": ("e1", "sig-b"), "s3://b/p/b.jpg": ("e1", "sig-a")}
    with psycopg.connect(pg_url) as conn:
        view = sql.Identifier(store.view)
        flagged = conn.execute(sql.SQL("SELECT uri, caption FROM {} WHERE flagged").format(view)).fetchall()
        assert flagged == [("s3://b/p/b.jpg", None)]
        columns = "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position"
        assert [c for (c,) in conn.execute(columns, (store.view,))] == [
            c for (c,) in conn.execute(columns, (store.table,))
        ]


def test_a_replaced_object_supersedes_its_older_rows(store: PostgresSink, pg_url: str) -> None:
    store.write([record("s3://b/p/a.jpg", "old"), record("s3://b/p/b.jpg", "e1")], "c1")
    marks = listed(store, "s3://b/p/", refs(("s3://b/p/a.jpg", "new"), ("s3://b/p/b.jpg", "e1")))
    assert marks == ListingMarks(superseded=1)
    # before the new version is annotated the view shows nothing for it, never the old caption
    assert current(store, pg_url) == {"s3://b/p/b.jpg": ("e1", "sig-a")}
    store.write([record("s3://b/p/a.jpg", "new", minutes=1)], "c2")
    assert current(store, pg_url) == {"s3://b/p/a.jpg": ("new", "sig-a"), "s3://b/p/b.jpg": ("e1", "sig-a")}
    assert marked(store, pg_url)[("s3://b/p/a.jpg", "old", "sig-a")] == (False, True)  # history stays

    # the object goes back to its old version: that row is current again, no new annotation needed
    marks = listed(store, "s3://b/p/", refs(("s3://b/p/a.jpg", "old"), ("s3://b/p/b.jpg", "e1")))
    assert marks == ListingMarks(superseded=1, restored=1)
    assert current(store, pg_url)["s3://b/p/a.jpg"] == ("old", "sig-a")


def test_a_complete_listing_marks_what_it_no_longer_lists(store: PostgresSink, pg_url: str) -> None:
    store.write([record(f"s3://b/p/{n}.jpg") for n in "abc"] + [record("s3://b/other/x.jpg")], "c1")
    marks = listed(store, "s3://b/p/", refs(("s3://b/p/a.jpg", "e1"), ("s3://b/p/c.jpg", "e1")))
    assert marks == ListingMarks(deleted=1)
    assert sorted(current(store, pg_url)) == ["s3://b/other/x.jpg", "s3://b/p/a.jpg", "s3://b/p/c.jpg"]
    assert marked(store, pg_url)[("s3://b/p/b.jpg", "e1", "sig-a")] == (True, False)

    # the object comes back (same content, so an incremental run would skip it): current again
    marks = listed(store, "s3://b/p/", refs(*[(f"s3://b/p/{n}.jpg", "e1") for n in "abc"]))
    assert marks == ListingMarks(reappeared=1)
    assert sorted(current(store, pg_url)) == [
        "s3://b/other/x.jpg",
        "s3://b/p/a.jpg",
        "s3://b/p/b.jpg",
        "s3://b/p/c.jpg",
    ]


def test_an_incomplete_listing_marks_nothing(store: PostgresSink, pg_url: str) -> None:
    store.write([record(f"s3://b/p/{n}.jpg") for n in "abc"], "c1")
    with store.listing("s3://b/p/") as listing:
        passing = listing.record(iter(refs(("s3://b/p/a.jpg", "e2"))))
        assert next(passing).uri == "s3://b/p/a.jpg"  # the listing stops here: cancelled, or it failed
        assert not listing.complete
        assert listing.finish() is None
    assert all(state == (False, False) for state in marked(store, pg_url).values())


def test_a_failing_listing_marks_nothing(store: PostgresSink, pg_url: str) -> None:
    store.write([record("s3://b/p/a.jpg")], "c1")

    def broken() -> Iterator[ImageRef]:
        yield ImageRef(uri="s3://b/p/b.jpg", etag="e1")
        raise OSError("listing failed")

    with store.listing("s3://b/p/") as listing:
        with pytest.raises(OSError):
            list(listing.record(broken()))
        assert listing.finish() is None
    assert marked(store, pg_url) == {("s3://b/p/a.jpg", "e1", "sig-a"): (False, False)}


def test_like_wildcards_in_a_prefix_match_only_themselves(store: PostgresSink, pg_url: str) -> None:
    prefix = "s3://b/100%_done\\/"
    neighbours = ["s3://b/100%Xdone\\/a.jpg", "s3://b/100XYdone\\/a.jpg", "s3://b/100%_done/a.jpg"]
    store.write([record(prefix + "a.jpg"), record(prefix + "gone.jpg")] + [record(uri) for uri in neighbours], "c1")
    assert listed(store, prefix, refs((prefix + "a.jpg", "e1"))) == ListingMarks(deleted=1)
    assert sorted(current(store, pg_url)) == sorted([prefix + "a.jpg", *neighbours])


def test_rows_written_after_the_listing_started_are_left_to_the_next_listing(store: PostgresSink, pg_url: str) -> None:
    with store.listing("s3://b/p/") as listing:
        passing = listing.record(iter(refs(("s3://b/p/a.jpg", "e1"))))
        next(passing)
        # an object created behind the listing, annotated by another job meanwhile
        store.write([record("s3://b/p/new.jpg")], "c1")
        assert list(passing) == []
        assert listing.finish() == ListingMarks()
    assert "s3://b/p/new.jpg" in current(store, pg_url)


def test_many_listed_objects_go_to_the_database_in_batches(store: PostgresSink, pg_url: str) -> None:
    count = 25_000  # more than one COPY batch
    items = [ImageRef(uri=f"s3://b/p/{n:06d}.jpg", etag="e1") for n in range(count)]
    store.write([record(item.uri) for item in items[:3]] + [record("s3://b/p/zz-gone.jpg")], "c1")
    with store.listing("s3://b/p/") as listing:
        assert sum(1 for _ in listing.record(iter(items))) == count
        assert listing.finish() == ListingMarks(deleted=1)


# -- migration ---------------------------------------------------------------------------------------

V1_TABLE = """
CREATE TABLE imagemill_records (
 uri text NOT NULL, etag text NOT NULL, signature text NOT NULL, job_id text, flagged boolean,
 caption text, error_kind text, processed_at timestamptz NOT NULL, record jsonb NOT NULL,
 PRIMARY KEY (uri, etag, signature));
CREATE INDEX imagemill_records_job_id_idx ON imagemill_records (job_id);
CREATE INDEX imagemill_records_error_kind_idx ON imagemill_records (error_kind);
CREATE INDEX imagemill_records_flagged_idx ON imagemill_records (flagged);
CREATE TABLE imagemill_meta (key text PRIMARY KEY, value text NOT NULL);
INSERT INTO imagemill_meta VALUES ('schema_version', '1');
"""


@pytest.mark.slow  # a database of its own on the PostgreSQL server
def test_a_version_1_table_is_migrated_in_place() -> None:
    with fresh_database(admin_url()) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(V1_TABLE)  # what imagemill 1 created: 11 rows for 10 objects, one replaced
            for n in range(10):
                conn.execute(
                    "INSERT INTO imagemill_records VALUES (%s, 'e1', 'sig-a', 'job1', false, 'c', NULL, %s, '{}')",
                    (f"s3://b/p/{n}.jpg", T0),
                )
            conn.execute(
                "INSERT INTO imagemill_records VALUES ('s3://b/p/3.jpg', 'e2', 'sig-a', 'job2', true, 'c2', NULL, %s,"
                " '{}')",
                (T0 + timedelta(hours=1),),
            )
        with PostgresSink(url) as store:
            assert store.count() == 11  # history kept
            assert current(store, url) == {f"s3://b/p/{n}.jpg": ("e2" if n == 3 else "e1", "sig-a") for n in range(10)}
            # the first complete listing after the migration marks the rows of before it
            items = refs(*[(f"s3://b/p/{n}.jpg", "e2" if n == 3 else "e1") for n in range(9)])
            assert listed(store, "s3://b/p/", items) == ListingMarks(deleted=1, superseded=1)
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT value FROM imagemill_meta").fetchall() == [(str(SCHEMA_VERSION),)]
            assert conn.execute("SELECT count(*) FROM imagemill_current").fetchone() == (9,)


# -- end to end: submit, real workers, the S3 server ------------------------------------------------


def _submit(env: dict[str, str], source: str, *extra: str) -> str:
    return submitted(run_cli("submit", source, "--tasks", "moderation", "--chunk-size", "4", "--wait", *extra, env=env))


def _view(pg_url: str, bucket: str) -> dict[str, str]:
    """The view's rows of this test's bucket (the database is shared by the whole session's tests)."""
    query = "SELECT uri, etag FROM imagemill_current WHERE uri LIKE %s"
    with psycopg.connect(pg_url) as conn:
        return dict(conn.execute(query, (f"s3://{bucket}/%",)).fetchall())


def _deleted(pg_url: str, uri: str) -> list[bool]:
    with psycopg.connect(pg_url) as conn:
        query = "SELECT deleted_at IS NOT NULL FROM imagemill_records WHERE uri = %s"
        return [deleted for (deleted,) in conn.execute(query, (uri,))]


@pytest.mark.slow
def test_replaced_and_deleted_objects_leave_the_view_on_resubmit(
    dist_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    endpoint = dist_env["IMAGEMILL_S3_ENDPOINT_URL"]
    keys = upload_photos(endpoint, bucket, "now/", 10)
    uris = [f"s3://{bucket}/{key}" for key in keys]
    workers.append(start_worker(dist_env, tmp_path / "worker.log").wait_ready())
    source = f"s3://{bucket}/now/"
    _submit(dist_env, source)
    first = _view(pg_url, bucket)
    assert sorted(first) == uris

    client = s3_client(endpoint)
    client.put_object(Bucket=bucket, Key=keys[3], Body=photo_jpeg(200, 150))  # another image, another etag
    job_id = _submit(dist_env, source)
    job = JobRegistry(dist_env["IMAGEMILL_BROKER_URL"]).get(job_id)
    assert (job.listed, job.skipped, job.queued) == (10, 9, 1)  # only the replaced one is annotated again
    view = _view(pg_url, bucket)
    assert len(view) == 10 and view[uris[3]] != first[uris[3]]
    assert {uri: etag for uri, etag in view.items() if uri != uris[3]} == {
        uri: etag for uri, etag in first.items() if uri != uris[3]
    }
    with psycopg.connect(pg_url) as conn:
        history = conn.execute("SELECT etag FROM imagemill_records WHERE uri = %s", (uris[3],)).fetchall()
    assert len(history) == 2  # the older version's row stays, out of the view

    client.delete_object(Bucket=bucket, Key=keys[5])
    job_id = _submit(dist_env, source)
    job = JobRegistry(dist_env["IMAGEMILL_BROKER_URL"]).get(job_id)
    assert (job.listed, job.skipped, job.queued) == (9, 9, 0)  # a deleted object costs nothing
    view = _view(pg_url, bucket)
    assert len(view) == 9 and uris[5] not in view
    assert _deleted(pg_url, uris[5]) == [True]

    # a manifest names some objects; it says nothing about the others
    manifest = tmp_path / "some.txt"
    manifest.write_text(f"{uris[0]}\n")
    client.delete_object(Bucket=bucket, Key=keys[6])
    _submit(dist_env, str(manifest))
    assert len(_view(pg_url, bucket)) == 9 and _deleted(pg_url, uris[6]) == [False]

    # the next complete scan notices
    _submit(dist_env, source)
    assert len(_view(pg_url, bucket)) == 8 and _deleted(pg_url, uris[6]) == [True]


class BrokenListing:
    """An S3-like prefix whose listing fails half-way."""

    uri_prefix = "s3://b/broken/"

    def __str__(self) -> str:
        return self.uri_prefix

    def refs(self) -> Iterator[ImageRef]:
        yield ImageRef(uri=self.uri_prefix + "a.jpg", etag="e1")
        raise SourceError("cannot list s3://b/broken/: SlowDown")


def test_a_submission_whose_listing_fails_marks_nothing(redis_url: str, pg_url: str) -> None:
    sink = f"{pg_url}?table=t_{secrets.token_hex(4)}"
    with PostgresSink(sink) as store:
        store.write([record("s3://b/broken/a.jpg"), record("s3://b/broken/b.jpg")], "c1")
    settings = Settings(broker_url=redis_url)
    assert isinstance(BrokenListing(), PrefixSource)
    with (
        JobRegistry(redis_url) as registry,
        Submission(BrokenListing(), (Task.MODERATION,), sink, settings, registry) as submission,
    ):
        submission.register()
        with pytest.raises(SourceError):
            submission.run()
    with PostgresSink(sink) as store:
        assert marked(store, pg_url) == {
            ("s3://b/broken/a.jpg", "e1", "sig-a"): (False, False),
            ("s3://b/broken/b.jpg", "e1", "sig-a"): (False, False),
        }
