"""Finished jobs expire: every key a job owns is gone from Redis after IMAGEMILL_JOB_RETENTION.

With `maxmemory-policy noeviction` (as compose and deploy/ run Redis) keys that never expire fill
Redis until enqueues fail; a finished job (done, failed, cancelled) keeps its keys only this long.
"""

import time
from collections.abc import Callable

import pytest
import redis

from imagemill.core.jobs import JobRegistry, JobState
from imagemill.core.tasks import Task
from tests.fixtures.cli import run_cli
from tests.fixtures.distributed import wait_for

pytestmark = pytest.mark.slow  # a private redis-server


def job_keys(client: redis.Redis, job_id: str) -> list[str]:
    """The keys in Redis that hold anything of this job (its own keys, and its index entries)."""
    owned = sorted(client.scan_iter(f"*{job_id}*"))
    for shared in ("imagemill:jobs", "imagemill:jobs:expiring"):
        if client.type(shared) == "zset" and client.zscore(shared, job_id) is not None:
            owned.append(f"{shared}[{job_id}]")
    for key in client.scan_iter("imagemill:active*"):
        kind = client.type(key)
        if (kind == "hash" and job_id in client.hvals(key)) or (kind == "string" and client.get(key) == job_id):
            owned.append(key)
    return owned


def done(registry: JobRegistry, job_id: str) -> None:
    registry.add_queued(job_id, listed=2, queued=2)
    registry.begin_attempt(job_id, f"{job_id}/000000")
    registry.end_attempt(job_id, f"{job_id}/000000")
    registry.chunk_done(job_id, f"{job_id}/000000", {"annotated": 2})
    registry.end_listing(job_id, 1)


ENDINGS: dict[str, Callable[[JobRegistry, str], object]] = {
    "done": done,
    "failed": lambda registry, job_id: registry.fail(job_id, "AccessDenied"),
    "cancelled": lambda registry, job_id: registry.cancel(job_id),
}


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_a_finished_job_and_all_its_keys_expire_after_the_retention(
    redis_url: str, ending: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEMILL_JOB_RETENTION", "1")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    registry = JobRegistry(redis_url)
    job, _ = registry.create("job1", "s3://b/p", (Task.CAPTION,), "postgresql://db/x", "imagemill", idempotency_key="k")
    registry.begin_attempt(job.id, "job1/000001")  # a delivery that died: the attempts hash stays
    assert job_keys(client, job.id)
    ENDINGS[ending](registry, job.id)
    finished = registry.get(job.id)
    assert finished is not None and finished.state == JobState(ending)
    for key in client.scan_iter(f"imagemill:job:{job.id}*"):
        assert 0 < client.pttl(key) <= 1000, f"{key} does not expire with its job"
    assert finished.expires_at is not None and finished.expires_at == pytest.approx(time.time() + 1, abs=1)
    # a chunk counted after the job failed or was cancelled expires with it too
    registry.chunk_done(job.id, "job1/000009", {"annotated": 1})
    wait_for(lambda: client.exists(registry.key(job.id)) == 0, 10, "the job hash to expire")
    registry.recent()  # what `imagemill jobs` does: drops index entries of expired jobs
    assert job_keys(client, job.id) == []
    # the same source submitted again is a new job, and late writes do not bring the old one back
    again, created = registry.create(
        "job2", "s3://b/p", (Task.CAPTION,), "postgresql://db/x", "imagemill", idempotency_key="k"
    )
    assert created and again.id == "job2"
    registry.heartbeat(job.id)
    registry.chunk_started(job.id, "sig")
    registry.add_queued(job.id, listed=1, queued=1)
    assert registry.get(job.id) is None and not registry.take_over(job.id, 0.001)
    assert [j.id for j in registry.recent()] == ["job2"]


def test_an_attempt_begun_after_its_job_finished_expires_with_the_job(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    registry = JobRegistry(redis_url, retention_s=600)
    job, _ = registry.create("job1", "s3://b/p", (Task.CAPTION,), "postgresql://db/x", "imagemill")
    registry.fail(job.id, "AccessDenied")  # before any chunk started: the job has no attempts hash yet
    attempts = registry.job_keys(job.id)[2]
    assert client.exists(attempts) == 0
    # a chunk queued before the failure and delivered after it makes the attempts hash now
    assert registry.begin_attempt(job.id, "job1/000003") == 1
    job_ttl = client.pttl(registry.key(job.id))
    assert 0 < client.pttl(attempts) <= job_ttl <= 600_000, "the attempts hash outlives its job"


def test_a_running_job_never_expires(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    registry = JobRegistry(redis_url, retention_s=1)
    job, _ = registry.create("job1", "s3://b/p", (Task.CAPTION,), "postgresql://db/x", "imagemill")
    registry.add_queued(job.id, listed=2, queued=2)
    registry.chunk_done(job.id, "job1/000000", {"annotated": 2})
    registry.begin_attempt(job.id, "job1/000001")
    assert all(client.ttl(key) == -1 for key in client.scan_iter("imagemill:job:*"))
    assert registry.get(job.id).expires_at is None


def test_the_default_retention_is_a_week_and_jobs_shows_it(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGEMILL_JOB_RETENTION", raising=False)
    registry = JobRegistry(redis_url)
    assert registry.retention_s == 7 * 24 * 3600
    registry.create("job1", "s3://b/p", (Task.CAPTION,), "postgresql://db/x", "imagemill")
    registry.create("job2", "s3://b/q", (Task.CAPTION,), "postgresql://db/x", "imagemill")
    registry.cancel("job2")
    listing = run_cli("jobs", env={"IMAGEMILL_BROKER_URL": redis_url, "COLUMNS": "200"})
    assert listing.returncode == 0, listing.stderr
    lines = {line.split("│")[1].strip(): line for line in listing.stdout.splitlines() if "job" in line and "│" in line}
    assert "kept" in listing.stdout
    assert "while running" in lines["job1"]
    assert "7d" in lines["job2"]
