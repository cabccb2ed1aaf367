"""Chaos: kill, break and restart real parts mid-job; every image still ends as exactly one record.

Private Redis and PostgreSQL databases only; the machine's shared services are never touched.
"""

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from imagemill.core.jobs import JobRegistry, JobState
from tests.fixtures.cli import REPO, run_cli
from tests.fixtures.distributed import job_id_of, rows, submitted, upload_photos, wait_for
from tests.fixtures.redis import RedisServer
from tests.fixtures.s3 import free_port
from tests.fixtures.workers import start_worker
from tests.test_metrics import parse, scrape, value

pytestmark = pytest.mark.slow  # kills and restarts workers, Redis and producers mid-job


def exactly_once(pg_url: str, job_ids: list[str], expected_uris: list[str]) -> Counter[str]:
    """Every expected uri has exactly one row across these jobs; returns their error kinds."""
    found = [row for job_id in job_ids for row in rows(pg_url, job_id)]
    uris = Counter(row[0] for row in found)
    assert sorted(uris) == sorted(expected_uris), "missing or unexpected records"
    assert max(uris.values()) == 1, f"duplicated: {[u for u, n in uris.items() if n > 1]}"
    return Counter(row[1] for row in found)


def metrics_env(port: int) -> dict[str, str]:
    return {"IMAGEMILL_METRICS_PORT": str(port), "IMAGEMILL_METRICS_ADDR": "127.0.0.1"}


def start_submit(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "imagemill", "submit", *args],
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_worker_killed_mid_chunk_its_chunk_is_redelivered_and_counted_once(
    dist_env, bucket, pg_url, workers, tmp_path: Path
) -> None:
    keys = upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "kill/", 16)
    env = {
        **dist_env,
        "IMAGEMILL_VISIBILITY_TIMEOUT": "4",
        "IMAGEMILL_TEST_FAULTS": json.dumps({"sleep_per_image_s": 0.15}),
    }
    job_id = submitted(run_cli("submit", f"s3://{bucket}/kill/", "--tasks", "moderation", "--chunk-size", "4", env=env))
    registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])
    victim = start_worker(env, tmp_path / "victim.log")
    workers.append(victim)
    wait_for(lambda: registry.get(job_id).chunks_done >= 1, 90, "a first chunk")
    wait_for(lambda: victim.log.count("received") > victim.log.count("succeeded"), 30, "a chunk in progress")
    os.killpg(victim.process.pid, signal.SIGKILL)  # the supervisor, Celery and its child, all at once
    victim.process.wait()
    done_before = registry.get(job_id).chunks_done
    assert done_before < 4
    port = free_port()
    workers.append(start_worker({**env, **metrics_env(port)}, tmp_path / "rescuer.log"))
    wait_for(lambda: registry.state(job_id) != JobState.RUNNING, 120, "the job to end")
    job = registry.get(job_id)
    assert job.state == JobState.DONE
    assert (job.annotated, job.failed, job.chunks_done) == (16, 0, 4)
    assert exactly_once(pg_url, [job_id], [f"s3://{bucket}/{k}" for k in keys]) == {None: 16}
    # the chunk the victim held, never counted done, is counted once by the rescuer with the rest
    assert value(parse(scrape(port)), "imagemill_chunks_total", outcome="annotated") == 4 - done_before


def test_poison_chunk_is_dead_lettered_after_bounded_retries_and_retry_redoes_it(
    dist_env, bucket, pg_url, workers, tmp_path: Path
) -> None:
    names = ["a.jpg", "b.jpg", "c.jpg", "poison.jpg", "e.jpg", "f.jpg"]
    keys = upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "batch/", 0, names)
    env = {
        **dist_env,
        "IMAGEMILL_MAX_WORKER_LOSSES": "2",
        "IMAGEMILL_TEST_FAULTS": json.dumps({"crash_on_uri": "poison"}),
    }
    port = free_port()
    workers.append(start_worker({**env, **metrics_env(port)}, tmp_path / "worker.log").wait_ready())
    result = run_cli(
        "submit", f"s3://{bucket}/batch/", "--tasks", "moderation", "--chunk-size", "3", "--wait", env=env, timeout=240
    )
    job_id = submitted(result)
    job = JobRegistry(env["IMAGEMILL_BROKER_URL"]).get(job_id)
    assert job.state == JobState.DONE and job.chunks_dead_lettered == 1
    assert (job.annotated, job.failed_by_kind) == (3, {"worker_lost": 3})
    assert exactly_once(pg_url, [job_id], [f"s3://{bucket}/{k}" for k in keys]) == {None: 3, "worker_lost": 3}
    log = workers[0].log
    assert log.count("exited with 'signal 9 (SIGKILL)'") == 2  # bounded: IMAGEMILL_MAX_WORKER_LOSSES
    assert "dead-lettered" in log
    status = run_cli("status", job_id, env=env)
    assert "worker_lost" in status.stdout and "1 dead-lettered" in status.stdout
    # scraped from the worker process that dead-lettered it (the third: two died on the chunk)
    assert value(parse(scrape(port)), "imagemill_chunks_total", outcome="dead_lettered") == 1

    workers[0].stop()
    healthy = {**env, "IMAGEMILL_TEST_FAULTS": "{}"}
    workers.append(start_worker(healthy, tmp_path / "healthy.log").wait_ready())
    retried = submitted(run_cli("retry", job_id, "--kind", "worker_lost", "--wait", env=healthy))
    assert retried != job_id
    redone = rows(pg_url, retried)
    assert sorted(r[0] for r in redone) == sorted(f"s3://{bucket}/batch/{n}" for n in names[3:])
    assert all(r[1] is None for r in redone)
    # the error rows were replaced, not added (the database is the session's: only this bucket's rows count)
    mine = [r[0] for r in rows(pg_url) if r[0].startswith(f"s3://{bucket}/")]
    assert len(mine) == len(set(mine)) == len(names)


def test_redis_restart_mid_job_loses_and_duplicates_nothing(
    model_env, s3_env, bucket, pg_url, workers, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis", password="s3cr3t-pass").start()
    try:
        env = {
            **model_env,
            "IMAGEMILL_BROKER_URL": server.url,
            "IMAGEMILL_S3_ENDPOINT_URL": s3_env,
            "IMAGEMILL_SINK": pg_url,
            "IMAGEMILL_VISIBILITY_TIMEOUT": "5",
            "IMAGEMILL_TEST_FAULTS": json.dumps({"sleep_per_image_s": 0.1}),
        }
        keys = upload_photos(s3_env, bucket, "redis/", 24)
        workers.append(start_worker(env, tmp_path / "worker.log").wait_ready())
        submit = start_submit(env, f"s3://{bucket}/redis/", "--tasks", "moderation", "--chunk-size", "3", "--wait")
        registry = JobRegistry(server.url)
        wait_for(lambda: bool(registry.recent(1)) and registry.recent(1)[0].chunks_done >= 2, 90, "two chunks")
        job_id = registry.recent(1)[0].id
        server.stop()  # AOF with fsync always: queued and unacknowledged chunks survive
        server.start()
        out, err = submit.communicate(timeout=240)
        assert submit.returncode == 0, err[-3000:]
        assert job_id_of(out) == job_id
        job = registry.get(job_id)
        assert job.state == JobState.DONE and (job.annotated, job.chunks_done) == (24, 8)
        assert exactly_once(pg_url, [job_id], [f"s3://{bucket}/{k}" for k in keys]) == {None: 24}
        assert "s3cr3t-pass" not in workers[0].log and "s3cr3t-pass" not in err
    finally:
        for worker in workers:
            worker.stop()
        workers.clear()
        server.stop()


# "finishes" gives its 1.2 s chunk a timeout several times that (production's 60 s would only make a
# stop that waits out the timeout cost a minute); "handed back" gives its chunk 12 s of work against
# 0.5 s, so no delay in seeing the chunk start can let it finish in time.
@pytest.mark.parametrize(
    ("soft_timeout", "sleep_per_image", "outcome"), [("8", 0.3, "finishes"), ("0.5", 3.0, "handed back")]
)
def test_sigterm_lets_the_chunk_finish_or_hands_it_back_never_half_written(
    dist_env, bucket, pg_url, workers, tmp_path: Path, soft_timeout: str, sleep_per_image: float, outcome: str
) -> None:
    keys = upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, f"term{soft_timeout}/", 8)
    env = {
        **dist_env,
        "IMAGEMILL_SOFT_SHUTDOWN_TIMEOUT": soft_timeout,
        "IMAGEMILL_VISIBILITY_TIMEOUT": "4",
        "IMAGEMILL_TEST_FAULTS": json.dumps({"sleep_per_image_s": sleep_per_image}),
    }
    job_id = submitted(
        run_cli("submit", f"s3://{bucket}/term{soft_timeout}/", "--tasks", "moderation", "--chunk-size", "4", env=env)
    )
    registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])
    first = start_worker(env, tmp_path / "first.log")
    workers.append(first)
    wait_for(lambda: registry.get(job_id).started_at is not None, 60, "a chunk to start")
    assert first.stop(timeout=90) == 0
    written = len(rows(pg_url, job_id))
    assert written in (0, 4, 8)  # whole chunks only
    if outcome == "finishes":
        assert written >= 4 and registry.get(job_id).chunks_done >= 1
    else:
        assert written == 0 and registry.get(job_id).chunks_done == 0
    workers.append(start_worker({**env, "IMAGEMILL_TEST_FAULTS": "{}"}, tmp_path / "second.log"))
    wait_for(lambda: registry.state(job_id) != JobState.RUNNING, 120, "the job to end")
    assert registry.get(job_id).state == JobState.DONE
    assert exactly_once(pg_url, [job_id], [f"s3://{bucket}/{k}" for k in keys]) == {None: 8}


def test_resubmitting_a_running_job_attaches_and_a_dead_producer_is_resumed(
    dist_env, bucket, pg_url, workers, tmp_path: Path
) -> None:
    keys = upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "resume/", 20)
    env = {
        **dist_env,
        "IMAGEMILL_QUEUE_HIGH_WATER": "3",
        "IMAGEMILL_CHUNK_SIZE": "2",
        "IMAGEMILL_PRODUCER_STALE_S": "2",
    }
    args = (f"s3://{bucket}/resume/", "--tasks", "moderation")
    first = start_submit(env, *args)
    registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])
    wait_for(lambda: bool(registry.recent(1)) and registry.recent(1)[0].chunks_queued == 3, 60, "the queue to fill")
    job_id = registry.recent(1)[0].id

    alive = run_cli("submit", *args, env=env, timeout=60)  # the first producer is alive: attach only
    assert job_id_of(alive.stdout) == job_id and "producer is alive" in alive.stderr
    first.kill()  # the producer dies mid-listing, with the queue full
    first.wait()
    resumed = start_submit(env, *args, "--wait")
    workers.append(start_worker(env, tmp_path / "worker.log"))
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    assert job_id_of(out) == job_id and "lost its producer; resuming after" in err
    job = registry.get(job_id)
    assert job.state == JobState.DONE and job.queued == 20 and job.chunks_total == 10
    assert exactly_once(pg_url, [job_id], [f"s3://{bucket}/{k}" for k in keys]) == {None: 20}
