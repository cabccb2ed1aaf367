"""PostgreSQL chaos: the results store and a distributed job survive the database restarting or crashing.

Everything runs against a private PostgreSQL server started for this module (never the machine's shared
one), which the tests stop, restart and SIGKILL.
"""

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from imagemill.core.jobs import JobRegistry, JobState
from imagemill.core.schemas import Record
from imagemill.core.sinks.postgres import DEFAULT_TABLE, PostgresSink
from tests.fixtures.cli import REPO, run_cli
from tests.fixtures.distributed import submitted, upload_photos, wait_for
from tests.fixtures.images import photo_jpeg
from tests.fixtures.postgres import PrivatePostgres, fresh_database, private_postgres
from tests.fixtures.s3 import s3_client
from tests.fixtures.workers import WorkerProcess, start_worker

pytestmark = pytest.mark.slow  # a private PostgreSQL server, stopped and killed mid-job


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    with private_postgres() as server:
        yield server


@pytest.fixture
def chaos_db(private_pg: PrivatePostgres) -> Iterator[str]:
    """A fresh database on the private server; the server is running again before it is dropped."""
    private_pg.start()
    with fresh_database(private_pg.url()) as url:
        try:
            yield url
        finally:
            private_pg.start()  # a failed test may have left it stopped or killed


@pytest.fixture
def store(chaos_db: str) -> Iterator[PostgresSink]:
    writer = PostgresSink(chaos_db)
    writer.check()
    yield writer
    writer.close()


def records(prefix: str, count: int, job_id: str = "chaos") -> list[Record]:
    return [
        Record.model_validate(
            {
                "uri": f"s3://bucket/{prefix}/{i:05d}.jpg",
                "etag": f"e{i}",
                "signature": "sig",
                "job_id": job_id,
                "moderation": {"flagged": False, "scores": {"normal": 0.9, "nsfw": 0.1}, "model": "m"},
            }
        )
        for i in range(count)
    ]


def uris_in(url: str, like: str = "%") -> list[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT uri FROM {DEFAULT_TABLE} WHERE uri LIKE %s", (like,)).fetchall()
    return [uri for (uri,) in rows]


def with_retries(write: Callable[[], None], attempts: int = 6) -> int:
    """The caller's retry loop (what Celery's autoretry does for a chunk): returns the failures it absorbed."""
    for failures in range(attempts):
        try:
            write()
            return failures
        except psycopg.OperationalError:
            if failures == attempts - 1:
                raise
            time.sleep(0.1 * 2**failures)
    raise AssertionError("unreachable")


def test_store_writes_resume_after_postgres_restarts(
    private_pg: PrivatePostgres, store: PostgresSink, chaos_db: str
) -> None:
    chunk_a, chunk_b = records("a", 10), records("b", 10)
    store.write(chunk_a, "job/000001")
    private_pg.restart()
    failures = with_retries(lambda: store.write(chunk_b, "job/000002"))
    print(f"\nwrite after a restart: {failures} failed attempt(s) before it succeeded")
    assert failures <= 1, f"{failures} failed attempts after the restart"
    found = uris_in(chaos_db)
    assert len(found) == len(set(found)) == 20
    assert sorted(found) == sorted(r.uri for r in chunk_a + chunk_b)


def test_no_partial_chunk_is_visible_when_postgres_dies_mid_write(
    private_pg: PrivatePostgres, store: PostgresSink, chaos_db: str
) -> None:
    chunk = records("big", 5000)
    blocker = chunk[2500]
    # an uncommitted insert of one of the chunk's keys: the store's upsert of that key waits for this
    # transaction, so the write stops inside its own transaction with the first 2,500 rows already inserted
    holder = psycopg.connect(chaos_db)
    holder.execute(
        f"INSERT INTO {DEFAULT_TABLE} (uri, etag, signature, processed_at, record) VALUES (%s, %s, %s, now(), '{{}}')",
        (blocker.uri, blocker.etag, blocker.signature),
    )
    observer = psycopg.connect(chaos_db, autocommit=True)
    size_before = observer.execute("SELECT pg_relation_size(%s)", (DEFAULT_TABLE,)).fetchone()[0]
    outcome: list[BaseException] = []

    def write() -> None:
        try:
            store.write(chunk, "job/000001")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    deadline = time.monotonic() + 30
    waiting = None
    while time.monotonic() < deadline and waiting != "Lock":
        row = observer.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE application_name = 'imagemill' AND state = 'active'"
        ).fetchone()
        waiting = row[0] if row else None
        time.sleep(0.02)
    assert waiting == "Lock", "the store's write never blocked on the held key"
    size_during = observer.execute("SELECT pg_relation_size(%s)", (DEFAULT_TABLE,)).fetchone()[0]
    assert size_during > size_before, "the first half of the chunk should be in the heap, uncommitted"

    private_pg.kill()
    writer.join(timeout=30)
    assert not writer.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.OperationalError), outcome
    for conn in (holder, observer):
        conn.close()

    private_pg.start()  # crash recovery
    visible = len(uris_in(chaos_db, "s3://bucket/big/%"))
    print(f"\nafter a crash mid-write and recovery: {visible} of {len(chunk)} rows visible")
    assert visible in (0, len(chunk)), f"{visible} of {len(chunk)} rows of a half-written chunk are visible"

    failures = with_retries(lambda: store.write(chunk, "job/000001"))  # the chunk is retried
    assert failures <= 1
    found = uris_in(chaos_db, "s3://bucket/big/%")
    assert len(found) == len(set(found)) == len(chunk)


# -- end to end ------------------------------------------------------------------------------------

PHOTOS = 30
CHUNK_SIZE = 2


@pytest.fixture
def chaos_env(dist_env: dict[str, str], chaos_db: str) -> dict[str, str]:
    return {**dist_env, "IMAGEMILL_SINK": chaos_db, "IMAGEMILL_TASK_MAX_RETRIES": "20"}


def test_distributed_job_completes_when_postgres_restarts_mid_job(
    private_pg: PrivatePostgres,
    chaos_env: dict[str, str],
    bucket: str,
    chaos_db: str,
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    client = s3_client(chaos_env["IMAGEMILL_S3_ENDPOINT_URL"])
    data = photo_jpeg(160, 120)
    keys = [f"chaos/p{i:04d}.jpg" for i in range(PHOTOS)]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=data)
    workers.append(start_worker(chaos_env, tmp_path / "worker.log").wait_ready())
    worker = workers[0]

    submit = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imagemill",
            "submit",
            f"s3://{bucket}/chaos/",
            "--tasks",
            "moderation",
            "--chunk-size",
            str(CHUNK_SIZE),
            "--wait",
        ],
        env={**os.environ, **chaos_env, "PYTHONPATH": str(REPO), "COLUMNS": "120"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    registry = JobRegistry(chaos_env["IMAGEMILL_BROKER_URL"])
    try:
        deadline = time.monotonic() + 60
        job = None
        while time.monotonic() < deadline and submit.poll() is None:
            recent = registry.recent(1)
            job = recent[0] if recent else None
            if job is not None and job.chunks_done > 0:
                break
            time.sleep(0.01)
        assert job is not None and job.chunks_done > 0, f"no chunk finished; worker log:\n{worker.log[-3000:]}"
        chunks_total = -(-PHOTOS // CHUNK_SIZE)
        assert job.chunks_done < chunks_total, "the job finished before the database could be restarted"
        done_at_stop = job.chunks_done
        private_pg.stop()
        # down until a chunk's write has failed and the chunk is waiting to be retried (not a fixed time)
        wait_for(lambda: "Retry in" in worker.log, 60, "a chunk write to fail and be retried")
        private_pg.start()
        _, err = submit.communicate(timeout=120)
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.communicate()
    assert submit.returncode == 0, f"submit exited {submit.returncode}:\n{err[-2000:]}\nworker:\n{worker.log[-3000:]}"

    job = registry.get(job.id)
    assert job is not None and job.state == JobState.DONE
    found = uris_in(chaos_db)
    expected = sorted(f"s3://{bucket}/{key}" for key in keys)
    duplicates = len(found) - len(set(found))
    retries = len(re.findall(r"Retry in \S+", worker.log))
    print(
        f"\npostgres restart after {done_at_stop}/{chunks_total} chunks: records expected {len(expected)},"
        f" found {len(set(found))}, duplicated {duplicates}; chunk retries logged {retries}"
    )
    assert duplicates == 0 and sorted(found) == expected
    assert (job.listed, job.queued, job.annotated, job.failed) == (PHOTOS, PHOTOS, PHOTOS, 0)
    assert job.chunks_done == job.chunks_total == chunks_total
    assert retries > 0, "no chunk write failed while the database was down: the restart tested nothing"


def test_a_database_that_refuses_connections_fails_the_job_once_retries_are_spent(
    private_pg: PrivatePostgres,
    dist_env: dict[str, str],
    bucket: str,
    chaos_db: str,
    workers: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    """Refused connections are transient (retried with backoff); after IMAGEMILL_TASK_MAX_RETRIES the job
    is `failed` with the reason, never left running."""
    upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "refused/", 3)
    env = {**dist_env, "IMAGEMILL_SINK": chaos_db, "IMAGEMILL_TASK_MAX_RETRIES": "1"}
    job_id = submitted(run_cli("submit", f"s3://{bucket}/refused/", "--tasks", "moderation", env=env))
    database = urlsplit(chaos_db).path.lstrip("/")
    private_pg.refuse(database)  # after submit checked the sink: the chunk's write is what meets it
    try:
        workers.append(start_worker(env, tmp_path / "worker.log"))
        registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])
        wait_for(lambda: registry.state(job_id) != JobState.RUNNING, 120, "the job to end")
        job = registry.get(job_id)
        assert job.state == JobState.FAILED, job
        assert job.error and "failed after 1 retries" in job.error and "accepting connections" in job.error
        log = workers[0].log
        assert log.count("Retry in") == 1  # retried once (transient), then given up
        status = run_cli("status", job_id, env=env)
        assert "failed" in status.stdout and "accepting connections" in status.stdout + status.stderr
    finally:
        private_pg.allow(database)
    assert uris_in(chaos_db) == []  # nothing was written
