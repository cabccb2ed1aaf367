"""Distributed mode end to end: submit → private Redis → real CPU workers → PostgreSQL.

Workers are real `imagemill worker --gpus cpu` subprocesses running the tiny models.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagemill.core.broker import queue_depth
from imagemill.core.jobs import JobRegistry, JobState
from tests.fixtures.cli import REPO, run_cli
from tests.fixtures.distributed import job_id_of, rows, upload, upload_photos, wait_for
from tests.fixtures.images import write_mixed
from tests.fixtures.workers import start_worker

pytestmark = pytest.mark.slow  # real worker processes, Redis and PostgreSQL


def test_submit_wait_writes_one_row_per_object_and_status_says_done(
    dist_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    cases = write_mixed(tmp_path / "upload")
    upload(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "photos/2026/", cases)
    workers.append(start_worker(dist_env, tmp_path / "worker.log").wait_ready())
    result = run_cli(
        "submit",
        f"s3://{bucket}/photos/2026/",
        "--tasks",
        "caption,moderation,tags",
        "--chunk-size",
        "5",
        "--wait",
        env=dist_env,
    )
    assert result.returncode == 0, result.stderr + workers[0].log[-3000:]
    job_id = job_id_of(result.stdout)
    found = {uri: (kind, caption) for uri, kind, caption, _ in rows(pg_url, job_id)}
    assert len(found) == len(cases)
    for case in cases:
        kind, caption = found[f"s3://{bucket}/photos/2026/{case.name}"]
        assert kind == case.expected_error, case.name
        assert (caption is None) == (case.expected_error is not None), case.name

    status = run_cli("status", job_id, env=dist_env)
    assert status.returncode == 0
    job = JobRegistry(dist_env["IMAGEMILL_BROKER_URL"]).get(job_id)
    failed = sum(1 for c in cases if c.expected_error)
    assert job.state == JobState.DONE and "done" in status.stdout + status.stderr
    assert (job.listed, job.queued, job.annotated, job.failed) == (len(cases), len(cases), len(cases) - failed, failed)
    assert job.failed_by_kind == {
        kind: sum(1 for c in cases if c.expected_error == kind) for kind in {c.expected_error for c in cases} if kind
    }
    assert job.chunks_done == job.chunks_total == -(-len(cases) // 5)


def test_two_workers_share_a_job_without_double_writing(
    dist_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    keys = upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "shared/", 40)
    for name in ("a", "b"):
        workers.append(start_worker(dist_env, tmp_path / f"worker-{name}.log"))
    for worker in workers:
        worker.wait_ready()
    result = run_cli(
        "submit", f"s3://{bucket}/shared/", "--tasks", "moderation", "--chunk-size", "2", "--wait", env=dist_env
    )
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result.stdout)
    uris = [uri for uri, *_ in rows(pg_url, job_id)]
    assert sorted(uris) == sorted(f"s3://{bucket}/{k}" for k in keys)
    done_by = [len(re.findall(rf"chunk {job_id}/\d+: annotated", w.log)) for w in workers]
    assert sum(done_by) == 20 and all(n > 0 for n in done_by), done_by
    job = JobRegistry(dist_env["IMAGEMILL_BROKER_URL"]).get(job_id)
    assert job.annotated == 40 and job.chunks_done == 20


def test_backpressure_holds_the_queue_under_its_mark_while_a_worker_drains(
    dist_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "many/", 30)
    env = {**dist_env, "IMAGEMILL_QUEUE_HIGH_WATER": "4", "IMAGEMILL_CHUNK_SIZE": "1"}
    submit = subprocess.Popen(
        [sys.executable, "-m", "imagemill", "submit", f"s3://{bucket}/many/", "--tasks", "moderation"],
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])
    wait_for(lambda: queue_depth(registry.redis, "imagemill") >= 4, 60, "the queue to fill to its mark")
    depths: list[int] = []
    held_until = time.monotonic() + 2  # no worker yet: the producer must stall at the mark
    while time.monotonic() < held_until:
        depths.append(queue_depth(registry.redis, "imagemill"))
        time.sleep(0.05)
    assert max(depths) == 4 and submit.poll() is None  # full to the mark, and waiting
    workers.append(start_worker(env, tmp_path / "worker.log"))
    while submit.poll() is None:
        depths.append(queue_depth(registry.redis, "imagemill"))
        time.sleep(0.05)
    assert submit.returncode == 0, submit.stderr.read()
    assert max(depths) <= 4
    job_id = job_id_of(submit.stdout.read())
    deadline = time.monotonic() + 120
    while registry.state(job_id) == JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.2)
    assert registry.state(job_id) == JobState.DONE
    assert len(rows(pg_url, job_id)) == 30


def test_cancel_stops_the_remaining_chunks(
    dist_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "cancel/", 12)
    result = run_cli("submit", f"s3://{bucket}/cancel/", "--tasks", "moderation", "--chunk-size", "1", env=dist_env)
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result.stdout)
    cancelled = run_cli("cancel", job_id, env=dist_env)
    assert cancelled.returncode == 0, cancelled.stderr
    workers.append(start_worker(dist_env, tmp_path / "worker.log").wait_ready())
    registry = JobRegistry(dist_env["IMAGEMILL_BROKER_URL"])
    deadline = time.monotonic() + 60
    while (registry.get(job_id).chunks_cancelled < 12) and time.monotonic() < deadline:
        time.sleep(0.2)
    job = registry.get(job_id)
    assert job.state == JobState.CANCELLED and job.chunks_cancelled == 12 and job.annotated == 0
    assert rows(pg_url, job_id) == []
    again = run_cli("cancel", job_id, env=dist_env)
    assert again.returncode == 2 and "not running" in again.stderr


def test_a_malformed_message_is_rejected_and_the_worker_goes_on(
    dist_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    from imagemill.core.broker import CHUNK_TASK, make_celery
    from imagemill.core.settings import Settings

    workers.append(start_worker(dist_env, tmp_path / "worker.log").wait_ready())
    celery = make_celery(Settings(broker_url=dist_env["IMAGEMILL_BROKER_URL"]))
    celery.send_task(CHUNK_TASK, args=[{"job_id": "x", "refs": "not a list", "image_bytes": "AAAA"}], queue="imagemill")
    upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "after/", 3)
    result = run_cli("submit", f"s3://{bucket}/after/", "--tasks", "moderation", "--wait", env=dist_env)
    assert result.returncode == 0, result.stderr
    assert "rejected a malformed chunk message" in workers[0].log
    assert len(rows(pg_url, job_id_of(result.stdout))) == 3


def test_status_of_an_unknown_job_is_a_clear_error(dist_env: dict[str, str]) -> None:
    result = run_cli("status", "0123456789ab", env=dist_env)
    assert result.returncode == 2 and "no job 0123456789ab" in result.stderr


def test_submit_without_a_sink_says_how_to_give_one(dist_env: dict[str, str], tmp_path: Path) -> None:
    env = {**dist_env, "IMAGEMILL_SINK": ""}
    result = run_cli("submit", str(tmp_path), env=env)
    assert result.returncode == 2 and "--sink" in result.stderr
