"""Upload events (`imagemill watch`): S3 event notifications from SQS or a webhook become records
within seconds; removed objects leave the current view; nothing is lost to a watcher's crash.

The end-to-end tests use moto's server, which delivers a bucket's notifications to its own SQS.
"""

import json
import secrets
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql
from starlette.testclient import TestClient

from imagemill.core.broker import lane_depth, queue_depth
from imagemill.core.connections import redis_client
from imagemill.core.jobs import JobRegistry, JobState
from imagemill.core.lanes import Lane
from imagemill.core.schemas import Record
from imagemill.core.settings import Settings
from imagemill.core.sinks import ListingMarks
from imagemill.core.sinks.postgres import PostgresSink
from imagemill.producer.events.s3_events import Change, ObjectEvent, latest_per_object, parse
from imagemill.producer.events.webhook import address, webhook_app
from imagemill.producer.watch import Batcher, Handled
from tests.fixtures.cli import run_cli, run_main
from tests.fixtures.distributed import submitted, upload_photos, wait_for
from tests.fixtures.faults import with_faults
from tests.fixtures.s3 import free_port, s3_client
from tests.fixtures.watchers import messages_left, notify_queue, s3_event, start_watcher
from tests.fixtures.workers import start_worker

SECRET = "s3cret-webhook-token-0123"


def event_body(*records: tuple[str, str], bucket: str = "photos") -> str:
    """An S3 event message with one record per (event name, key as S3 encodes it)."""
    return json.dumps(
        {
            "Records": [
                {
                    "eventName": name,
                    "eventTime": f"2026-12-06T07:16:4{index}.861Z",
                    "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 2, "eTag": f'"etag{index}"'}},
                }
                for index, (name, key) in enumerate(records)
            ]
        }
    )


# -- reading events ------------------------------------------------------------------------------


def test_a_created_object_becomes_a_ref_with_the_events_etag_and_size_and_its_key_decoded() -> None:
    parsed = parse(event_body(("ObjectCreated:Put", "a+b%2Fc%2Bd+%C3%A9.jpg")))
    [event] = parsed.events
    assert event.change == Change.CREATED
    assert event.uri == "s3://photos/a b/c+d é.jpg"  # S3 sends a space as '+', a '+' as %2B
    assert (event.etag, event.size) == ("etag0", 2)
    assert event.ref.uri == event.uri and event.ref.etag == "etag0" and event.ref.size == 2
    assert event.event_time == datetime(2026, 12, 6, 7, 16, 40, 861000, tzinfo=UTC).timestamp()


def test_the_s3_test_event_is_ignored() -> None:
    parsed = parse(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "photos"}))
    assert parsed.events == [] and parsed.ignored == 1


def test_keys_without_an_image_extension_and_folders_are_skipped_like_a_listing_skips_them() -> None:
    parsed = parse(
        event_body(
            ("ObjectCreated:Put", "notes.txt"),
            ("ObjectCreated:Put", "folder/"),
            ("ObjectCreated:Put", "manifest.jsonl"),
            ("ObjectCreated:Put", "IMG_1.JPG"),
        )
    )
    assert [event.uri for event in parsed.events] == ["s3://photos/IMG_1.JPG"]
    assert parsed.ignored == 3


def test_removals_and_lifecycle_expirations_are_removed_and_other_event_kinds_ignored() -> None:
    parsed = parse(
        event_body(
            ("ObjectRemoved:Delete", "a.jpg"),
            ("ObjectRemoved:DeleteMarkerCreated", "b.jpg"),
            ("LifecycleExpiration:Delete", "c.jpg"),
            ("ObjectTagging:Put", "d.jpg"),
            ("ObjectRestore:Completed", "e.jpg"),
        )
    )
    assert [(event.change, event.uri[-5:]) for event in parsed.events] == [
        (Change.REMOVED, "a.jpg"),
        (Change.REMOVED, "b.jpg"),
        (Change.REMOVED, "c.jpg"),
    ]
    assert parsed.ignored == 2


def test_minio_event_names_and_sns_wrapped_messages_are_read_too() -> None:
    minio = parse(event_body(("s3:ObjectCreated:CompleteMultipartUpload", "big.png")))
    assert [event.change for event in minio.events] == [Change.CREATED]
    wrapped = json.dumps({"Type": "Notification", "Message": event_body(("ObjectCreated:Copy", "x.webp"))})
    assert [event.uri for event in parse(wrapped).events] == ["s3://photos/x.webp"]


@pytest.mark.parametrize(
    "body",
    ["not json", "[1, 2]", '{"Records": 3}', '{"Records": [{"eventName": "ObjectCreated:Put"}]}'],
    ids=["text", "list", "records-not-a-list", "record-without-s3"],
)
def test_a_body_that_is_not_an_s3_event_is_one_line_of_why(body: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse(body)
    assert "\n" not in str(raised.value) and str(raised.value)


def test_an_object_created_and_removed_in_one_batch_is_only_removed_and_the_reverse_only_created() -> None:
    def event(change: Change, uri: str, at: float) -> ObjectEvent:
        return ObjectEvent(change, uri, "e", 1, at)

    latest = latest_per_object(
        [
            event(Change.CREATED, "s3://b/gone.jpg", 1.0),
            event(Change.REMOVED, "s3://b/back.jpg", 1.0),
            event(Change.REMOVED, "s3://b/gone.jpg", 2.0),
            event(Change.CREATED, "s3://b/back.jpg", 2.0),
        ]
    )
    assert {(e.uri, e.change) for e in latest} == {
        ("s3://b/gone.jpg", Change.REMOVED),
        ("s3://b/back.jpg", Change.CREATED),
    }


# -- the webhook ---------------------------------------------------------------------------------


def answered(events: list[ObjectEvent]) -> "Future[object]":
    done: Future[object] = Future()
    done.set_result(Handled(enqueued=len(events)))
    return done


@pytest.fixture
def webhook() -> Iterator[tuple[TestClient, list[list[ObjectEvent]]]]:
    delivered: list[list[ObjectEvent]] = []

    def submit(events: list[ObjectEvent]) -> "Future[object]":
        delivered.append(events)
        return answered(events)

    with TestClient(webhook_app(submit, SECRET)) as client:
        yield client, delivered


def test_the_webhook_refuses_a_wrong_or_missing_secret_and_hands_nothing_on(
    webhook: tuple[TestClient, list[list[ObjectEvent]]],
) -> None:
    client, delivered = webhook
    body = event_body(("ObjectCreated:Put", "a.jpg"))
    for headers, params in [({}, {}), ({"Authorization": "Bearer wrong"}, {}), ({}, {"token": SECRET[:-1]})]:
        response = client.post("/", content=body, headers=headers, params=params)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert delivered == []


def test_the_webhook_takes_the_secret_as_a_bearer_token_or_a_query_token(
    webhook: tuple[TestClient, list[list[ObjectEvent]]],
) -> None:
    client, delivered = webhook
    body = event_body(("ObjectCreated:Put", "a.jpg"), ("ObjectCreated:Put", "b.txt"))
    by_header = client.post("/minio/events", content=body, headers={"Authorization": f"Bearer {SECRET}"})
    by_query = client.post("/", content=body, params={"token": SECRET})
    assert by_header.status_code == by_query.status_code == 200
    assert by_header.json() == {"events": 1, "ignored": 1}
    assert [[e.uri for e in events] for events in delivered] == [["s3://photos/a.jpg"]] * 2


def test_the_webhook_answers_400_to_a_body_that_is_not_an_event_and_503_when_enqueueing_fails() -> None:
    def failing(events: list[ObjectEvent]) -> "Future[object]":
        done: Future[object] = Future()
        done.set_exception(ConnectionError("redis is down"))
        return done

    with TestClient(webhook_app(failing, SECRET)) as client:
        auth = {"Authorization": f"Bearer {SECRET}"}
        assert client.post("/", content="nope", headers=auth).status_code == 400
        assert client.post("/", content=event_body(("ObjectCreated:Put", "a.jpg")), headers=auth).status_code == 503
        assert client.get("/healthz").status_code == 200


def test_the_batcher_hands_concurrent_deliveries_over_in_one_gathering() -> None:
    gatherings: list[list[str]] = []

    def handle(events: list[ObjectEvent]) -> Handled:
        gatherings.append([event.uri for event in events])
        return Handled(enqueued=len(events))

    batcher = Batcher(handle, window_s=0.5, max_events=100).start()
    futures = [batcher.submit([ObjectEvent(Change.CREATED, f"s3://b/{i}.jpg", "e", 1, 0.0)]) for i in range(3)]
    results = [future.result(timeout=10) for future in futures]
    batcher.stop()
    assert gatherings == [["s3://b/0.jpg", "s3://b/1.jpg", "s3://b/2.jpg"]]
    assert all(result.enqueued == 3 for result in results)


def test_the_http_source_must_name_host_and_port() -> None:
    assert address("http://0.0.0.0:8090") == ("0.0.0.0", 8090)
    for bad in ("http://host", "https://host:1", "http://host:1/path", "http://host:notaport"):
        with pytest.raises(Exception, match="expected http://HOST:PORT"):
            address(bad)


# -- the command's faults ------------------------------------------------------------------------


def test_the_http_receiver_refuses_to_start_without_a_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("IMAGEMILL_WATCH_SECRET", raising=False)
    code, lines = run_main(["watch", "http://127.0.0.1:1", "--sink", "postgresql://nowhere/db"], monkeypatch, capsys)
    assert code == 2
    assert lines == [
        "error: the HTTP receiver needs a shared secret: set IMAGEMILL_WATCH_SECRET (16 characters or more)"
    ]


def test_a_short_secret_is_refused_naming_the_variable_never_its_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGEMILL_WATCH_SECRET", "tooshort")
    code, lines = run_main(["watch", "http://127.0.0.1:1", "--sink", "postgresql://x/db"], monkeypatch, capsys)
    assert code == 2
    assert lines == ["error: IMAGEMILL_WATCH_SECRET: expected at least 16 characters"]


def test_an_unknown_event_source_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = run_main(["watch", "kafka://topic", "--sink", "postgresql://x/db"], monkeypatch, capsys)
    assert code == 2
    assert lines == ["error: source kafka://topic: expected sqs://QUEUE_NAME or http://HOST:PORT"]


def test_the_watch_settings_have_their_defaults() -> None:
    settings = Settings()
    assert (settings.watch_batch_s, settings.watch_batch_images, settings.watch_visibility_timeout) == (1.0, 32, 120)


# -- marks in PostgreSQL -------------------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def stored(uri: str, etag: str) -> Record:
    return Record.model_validate({"uri": uri, "etag": etag, "signature": "sig", "job_id": "j", "processed_at": T0})


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresSink]:
    with PostgresSink(f"{pg_url}?table=w_{secrets.token_hex(4)}") as sink:
        yield sink


def states(store: PostgresSink, pg_url: str) -> dict[tuple[str, str], tuple[bool, bool]]:
    """(uri, etag) -> (deleted, superseded) of every row."""
    query = sql.SQL("SELECT uri, etag, deleted_at IS NOT NULL, superseded_at IS NOT NULL FROM {}").format(
        sql.Identifier(store.table)
    )
    with psycopg.connect(pg_url) as conn:
        return {(u, e): (d, s) for u, e, d, s in conn.execute(query)}


def test_a_removal_event_marks_its_object_deleted_and_a_later_creation_brings_it_back(
    store: PostgresSink, pg_url: str
) -> None:
    store.write([stored("s3://b/a.jpg", "e1"), stored("s3://b/keep.jpg", "e1")])
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert store.mark_events([], [("s3://b/a.jpg", "e1", later)]) == ListingMarks(deleted=1)
    assert states(store, pg_url) == {("s3://b/a.jpg", "e1"): (True, False), ("s3://b/keep.jpg", "e1"): (False, False)}
    # the same bytes uploaded again: the record is current again (and the watcher skips annotating it)
    again = later + timedelta(seconds=1)
    assert store.mark_events([("s3://b/a.jpg", "e1", again)], []).reappeared == 1
    assert states(store, pg_url)[("s3://b/a.jpg", "e1")] == (False, False)


def test_a_creation_event_supersedes_the_rows_of_the_version_it_replaced(store: PostgresSink, pg_url: str) -> None:
    store.write([stored("s3://b/a.jpg", "old")])
    now = datetime.now(UTC) + timedelta(seconds=5)
    assert store.mark_events([("s3://b/a.jpg", "new", now)], []).superseded == 1
    assert states(store, pg_url) == {("s3://b/a.jpg", "old"): (False, True)}


def test_an_event_older_than_a_record_never_marks_it(store: PostgresSink, pg_url: str) -> None:
    """Events arrive out of order: one from before a record was written says nothing about it, and a
    creation older than a removal never brings the removed object back."""
    store.write([stored("s3://b/a.jpg", "v2")])
    past = datetime.now(UTC) - timedelta(minutes=5)
    assert store.mark_events([("s3://b/a.jpg", "v1", past)], [("s3://b/a.jpg", "v1", past)]) == ListingMarks()
    later = datetime.now(UTC) + timedelta(seconds=5)
    store.mark_events([], [("s3://b/a.jpg", "v2", later)])
    assert store.mark_events([("s3://b/a.jpg", "v2", later - timedelta(seconds=1))], []).reappeared == 0
    assert states(store, pg_url) == {("s3://b/a.jpg", "v2"): (True, False)}


# -- end to end: moto's S3 notifies its SQS, a watcher, a worker, PostgreSQL ----------------------


def records_of(pg_url: str, uris: list[str]) -> dict[str, int]:
    """uri -> how many rows the records table holds for it."""
    with psycopg.connect(pg_url) as conn:
        found = conn.execute(
            "SELECT uri, count(*) FROM imagemill_records WHERE uri = ANY(%s) GROUP BY uri", (uris,)
        ).fetchall()
    return dict(found)


def current_uris(pg_url: str, uris: list[str]) -> set[str]:
    with psycopg.connect(pg_url) as conn:
        return {uri for (uri,) in conn.execute("SELECT uri FROM imagemill_current WHERE uri = ANY(%s)", (uris,))}


@pytest.fixture
def watch_env(dist_env: dict[str, str]) -> dict[str, str]:
    """The distributed environment, with boto3's SQS pointed at moto's server (its usual variable)."""
    return {**dist_env, "AWS_ENDPOINT_URL_SQS": dist_env["IMAGEMILL_S3_ENDPOINT_URL"]}


@pytest.mark.slow
def test_uploads_get_records_and_a_removal_leaves_the_current_view(
    watch_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    endpoint = watch_env["IMAGEMILL_S3_ENDPOINT_URL"]
    queue = f"uploads-{uuid.uuid4().hex[:8]}"
    url = notify_queue(endpoint, bucket, queue)  # moto sends the S3 test event first: ignored
    workers.append(start_worker(watch_env, tmp_path / "worker.log").wait_ready())
    watcher = start_watcher(watch_env, tmp_path / "watch.log", f"sqs://{queue}", "--tasks", "moderation")
    try:
        watcher.wait_ready()
        keys = upload_photos(endpoint, bucket, "new/", 4, names=["a.jpg", "b c.jpg", "d+e.png", "f.jpeg"])
        s3_client(endpoint).put_object(Bucket=bucket, Key="new/readme.txt", Body=b"not an image")
        uris = [f"s3://{bucket}/{key}" for key in keys]
        wait_for(lambda: len(records_of(pg_url, uris)) == 4, 90, "records of the uploads", poll=0.5)
        assert records_of(pg_url, uris) == dict.fromkeys(uris, 1)
        assert records_of(pg_url, [f"s3://{bucket}/new/readme.txt"]) == {}

        job = JobRegistry(watch_env["IMAGEMILL_BROKER_URL"]).get(watcher.job_id)
        assert job is not None and job.source == f"sqs://{queue}" and job.tasks == ("moderation",)
        assert job.state == JobState.RUNNING and not job.listing_done  # the job runs while the watch does
        wait_for(lambda: JobRegistry(watch_env["IMAGEMILL_BROKER_URL"]).get(job.id).annotated == 4, 30, "counts")
        assert job.lane == Lane.URGENT
        status = run_cli("status", job.id, env=watch_env)
        assert status.returncode == 0 and "4 (watching…)" in status.stdout and "running" in status.stdout
        # each upload's event time went with its ref: the worker measured upload-to-record
        upload_row = next(line for line in status.stdout.splitlines() if "upload to record" in line)
        assert "job p50" in upload_row and "(4)" in upload_row, status.stdout

        s3_client(endpoint).delete_object(Bucket=bucket, Key="new/a.jpg")
        wait_for(lambda: uris[0] not in current_uris(pg_url, uris), 30, "the removal marked", poll=0.5)
        assert current_uris(pg_url, uris) == set(uris[1:])
        wait_for(lambda: messages_left(endpoint, url) == 0, 30, "every message deleted")
    finally:
        code = watcher.stop()
    assert code == 0, watcher.log[-3000:]
    assert JobRegistry(watch_env["IMAGEMILL_BROKER_URL"]).state(watcher.job_id) == JobState.RUNNING


@pytest.mark.slow
def test_a_watcher_killed_after_enqueueing_and_before_deleting_loses_nothing_and_doubles_nothing(
    watch_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    endpoint = watch_env["IMAGEMILL_S3_ENDPOINT_URL"]
    queue = f"crash-{uuid.uuid4().hex[:8]}"
    url = notify_queue(endpoint, bucket, queue)
    keys = upload_photos(endpoint, bucket, "crash/", 6)
    uris = [f"s3://{bucket}/{key}" for key in keys]
    env = {**watch_env, "IMAGEMILL_WATCH_VISIBILITY_TIMEOUT": "5"}
    registry = JobRegistry(watch_env["IMAGEMILL_BROKER_URL"])

    # the first watcher enqueues the uploads' chunk, then dies (SIGKILL) where it would delete the messages
    first = start_watcher(with_faults(env, {"kill_before_sqs_delete": True}), tmp_path / "w1.log", f"sqs://{queue}")
    first.wait_ready()
    assert first.process.wait(timeout=60) == -9, first.log[-3000:]
    job_id = first.job_id
    assert registry.get(job_id).queued == 6
    assert messages_left(endpoint, url) == 7  # the six uploads and the test event, none deleted

    # a second watcher joins the same job; SQS delivers the messages again after the visibility timeout,
    # before any record exists, so the same images are enqueued a second time
    second = start_watcher(env, tmp_path / "w2.log", f"sqs://{queue}").wait_ready()
    try:
        assert second.job_id == job_id
        wait_for(lambda: messages_left(endpoint, url) == 0, 60, "the redelivered messages deleted")
        assert registry.get(job_id).queued == 12
        workers.append(start_worker(watch_env, tmp_path / "worker.log").wait_ready())
        wait_for(lambda: registry.get(job_id).chunks_done == registry.get(job_id).chunks_queued, 120, "both chunks")
    finally:
        assert second.stop() == 0, second.log[-3000:]
    # every upload ends as exactly one record
    assert records_of(pg_url, uris) == dict.fromkeys(uris, 1)


@pytest.mark.slow
def test_the_http_receiver_answers_only_once_the_events_are_enqueued_and_refuses_a_wrong_secret(
    watch_env: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    endpoint = watch_env["IMAGEMILL_S3_ENDPOINT_URL"]
    [key] = upload_photos(endpoint, bucket, "hook/", 1)
    etag = s3_client(endpoint).head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    port = free_port()
    env = {**watch_env, "IMAGEMILL_WATCH_SECRET": SECRET}
    watcher = start_watcher(env, tmp_path / "hook.log", f"http://127.0.0.1:{port}", "--tasks", "tags")
    try:
        watcher.wait_ready()
        hook = f"http://127.0.0.1:{port}/"
        wait_for(lambda: _healthy(f"{hook}healthz"), 30, "the receiver listening")
        body = s3_event(bucket, key, etag, 10)
        refused = httpx.post(hook, content=body, headers={"Authorization": "Bearer not-the-secret-at-all"})
        assert refused.status_code == 401
        accepted = httpx.post(hook, content=body, params={"token": SECRET}, timeout=30)
        assert accepted.status_code == 200, watcher.log[-3000:]
        # answered after enqueueing: the chunk is in the queue and the job counts it, no worker needed
        broker = redis_client(watch_env["IMAGEMILL_BROKER_URL"])
        assert queue_depth(broker, "imagemill") == lane_depth(broker, "imagemill", Lane.URGENT) == 1
        job = JobRegistry(watch_env["IMAGEMILL_BROKER_URL"]).get(watcher.job_id)
        assert job is not None and job.queued == 1 and job.source == f"http://127.0.0.1:{port}"
    finally:
        assert watcher.stop() == 0, watcher.log[-3000:]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def test_watchers_of_one_job_reserve_chunk_numbers_no_other_gets_and_none_once_the_job_is_gone(
    redis_url: str,
) -> None:
    registry = JobRegistry(redis_url)
    job, _ = registry.create("watchjob0001", "sqs://q", ("moderation",), "postgresql://db/x", "imagemill")
    firsts = [registry.reserve_chunks(job.id) for _ in range(3)] + [registry.reserve_chunks(job.id, 5)]
    assert firsts == [0, 1, 2, 3] and registry.reserve_chunks(job.id) == 8
    assert registry.reserve_chunks("nosuchjob000") is None


@pytest.mark.slow
def test_uploads_get_records_while_a_queued_backfill_is_still_running(
    watch_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    """The issue's check: a backfill queued on one worker, then uploads: their records come within
    seconds, long before the backfill ends (their chunks go to the urgent lane, ahead of it)."""
    endpoint = watch_env["IMAGEMILL_S3_ENDPOINT_URL"]
    archive = f"archive-{uuid.uuid4().hex[:8]}"
    s3_client(endpoint).create_bucket(Bucket=archive)
    upload_photos(endpoint, archive, "old/", 300)
    queue = f"uploads-{uuid.uuid4().hex[:8]}"
    notify_queue(endpoint, bucket, queue)
    registry = JobRegistry(watch_env["IMAGEMILL_BROKER_URL"])
    backfill = submitted(
        run_cli(
            "submit", f"s3://{archive}/old/", "--tasks", "moderation", "--chunk-size", "10",
            "--priority", "backfill", env=watch_env,
        )
    )  # fmt: skip
    assert registry.get(backfill).queued == 300
    watcher = start_watcher(watch_env, tmp_path / "watch.log", f"sqs://{queue}", "--tasks", "moderation")
    # every image takes 50 ms more: the backfill takes 15 s or more on the one worker
    slow = with_faults(watch_env, {"sleep_per_image_s": 0.05})
    try:
        watcher.wait_ready()
        workers.append(start_worker(slow, tmp_path / "worker.log").wait_ready())
        wait_for(lambda: registry.get(backfill).processed >= 20, 60, "the backfill under way", poll=0.2)
        keys = upload_photos(endpoint, bucket, "fresh/", 3)
        uris = [f"s3://{bucket}/{key}" for key in keys]
        wait_for(lambda: len(records_of(pg_url, uris)) == 3, 30, "the uploads' records", poll=0.2)
        job = registry.get(backfill)
        assert job.state == JobState.RUNNING and job.processed < 300 - 50, job
    finally:
        assert watcher.stop() == 0, watcher.log[-3000:]
