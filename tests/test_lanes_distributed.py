"""Lanes and fair share end to end: one real CPU worker, a private Redis, the S3 server, PostgreSQL.

An urgent job overtakes a queued backfill at the next chunk boundary; two jobs in one lane take
turns, so a small one submitted after a big one finishes long before it; a retried chunk goes back
to its own lane.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from imagemill.api import submit
from imagemill.core.broker import lane_list
from imagemill.core.jobs import Job, JobRegistry, JobState
from imagemill.core.lanes import Lane
from imagemill.core.schemas import ImageRef
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task
from imagemill.pipeline.sources import RefListSource
from imagemill.producer.submit import Submission
from tests.fixtures.cli import REPO, run_cli
from tests.fixtures.distributed import job_id_of, rows, upload_photos, wait_for
from tests.fixtures.s3 import free_port
from tests.fixtures.workers import start_worker

pytestmark = pytest.mark.slow  # real worker processes, Redis and PostgreSQL


def start_submit(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "imagemill", "submit", *args],
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def job_in_lane(registry: JobRegistry, source: str) -> Job | None:
    """The job registered for `source` (its producer prints the id only when it is done enqueueing)."""
    return next((job for job in registry.recent(50) if job.source == source), None)


@dataclass
class Race:
    """What a fast poll of the registry saw of a long job while a short one ran beside it."""

    long_done_when_short_was_queued: int
    long_done_when_short_finished: int
    long_state_when_short_finished: JobState
    short: Job


def watch_race(registry: JobRegistry, long_id: str, short_source: str, short_chunks: int, timeout: float) -> Race:
    """Poll every 20 ms from the short job's registration to its end: the long job's chunks done
    when the short one's chunks were all enqueued, and when it finished."""
    deadline = time.monotonic() + timeout
    queued_at: int | None = None
    while time.monotonic() < deadline:
        long_job = registry.get(long_id)
        short = job_in_lane(registry, short_source)
        assert long_job is not None
        if short is not None and queued_at is None and short.chunks_queued >= short_chunks:
            queued_at = long_job.chunks_done
        if short is not None and short.state != JobState.RUNNING:
            assert queued_at is not None
            return Race(queued_at, long_job.chunks_done, long_job.state, short)
        time.sleep(0.02)
    raise AssertionError(f"the job of {short_source} did not finish in {timeout}s")


class ListPushes:
    """The Celery lists pushed onto, in order, from now until `stop`: Redis keyspace events name
    the key of every LPUSH and RPUSH (the registry's own `imagemill:` keys left out)."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.client.config_set("notify-keyspace-events", "Kl")  # an event for every list command, by key
        self.watching = self.client.pubsub()
        self.watching.psubscribe("__keyspace@0__:imagemill*")
        self.pushes: list[str] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        while not self.stopped.is_set():
            event = self.watching.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if event is not None and event["data"] in {"lpush", "rpush"}:
                key = event["channel"].removeprefix("__keyspace@0__:")
                if not key.startswith("imagemill:"):
                    self.pushes.append(key)

    def stop(self) -> list[str]:
        self.stopped.set()
        self.thread.join(timeout=10)
        self.watching.close()
        self.client.close()
        return self.pushes


def test_an_urgent_job_overtakes_a_queued_backfill_at_the_next_chunk_boundary(
    dist_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    endpoint = dist_env["IMAGEMILL_S3_ENDPOINT_URL"]
    upload_photos(endpoint, bucket, "backfill/", 240)
    upload_photos(endpoint, bucket, "urgent/", 6)
    env = {**dist_env, "IMAGEMILL_TEST_FAULTS": json.dumps({"sleep_per_image_s": 0.05})}
    backfill = run_cli(
        "submit", f"s3://{bucket}/backfill/", "--tasks", "moderation", "--chunk-size", "8", "--priority", "backfill",
        env=env,
    )  # fmt: skip
    backfill_id = job_id_of(backfill.stdout)
    registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])
    assert registry.get(backfill_id).chunks_queued == 30  # all 30 chunks wait in the backfill lane
    workers.append(start_worker(env, tmp_path / "worker.log").wait_ready())
    wait_for(lambda: registry.get(backfill_id).chunks_done >= 2, 120, "the backfill to be under way")

    source = f"s3://{bucket}/urgent/"
    urgent = start_submit(env, source, "--tasks", "moderation", "--chunk-size", "3", "--priority", "urgent")
    race = watch_race(registry, backfill_id, source, 2, 120)
    assert urgent.wait(timeout=30) == 0, urgent.stderr.read() if urgent.stderr else ""

    assert race.short.state == JobState.DONE and race.short.lane == Lane.URGENT
    assert race.long_state_when_short_finished == JobState.RUNNING  # the backfill still runs
    # at most the backfill chunk that was running when the urgent chunks arrived (and one more for
    # the polling's resolution) finished before the urgent job did: none queued behind was taken first
    assert race.long_done_when_short_finished - race.long_done_when_short_was_queued <= 2, race
    assert race.long_done_when_short_finished < 30 - 5
    assert len(rows(pg_url, race.short.id)) == 6

    status = run_cli("status", race.short.id, "--json", env=env)
    waits = json.loads(status.stdout)["latency"]["queue_wait"]["job"]
    assert waits["samples"] == 2 and waits["p95"] is not None
    wait_for(lambda: registry.state(backfill_id) == JobState.DONE, 180, "the backfill to finish")
    assert len(rows(pg_url, backfill_id)) == 240  # nothing lost nor doubled by being overtaken
    backfill_waits = registry.latencies("queue_wait", job_id=backfill_id)
    assert len(backfill_waits) == 30 and max(backfill_waits) > waits["p95"]


def test_two_jobs_in_one_lane_take_turns_so_a_small_one_after_a_big_one_finishes_first(
    dist_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = dist_env["IMAGEMILL_S3_ENDPOINT_URL"]
    upload_photos(endpoint, bucket, "big/", 120)
    upload_photos(endpoint, bucket, "small/", 6)
    env = {
        **dist_env,
        "IMAGEMILL_QUEUE_HIGH_WATER": "2",  # a shallow lane: room is handed out as the worker frees it
        "IMAGEMILL_CHUNK_SIZE": "2",
        "IMAGEMILL_TEST_FAULTS": json.dumps({"sleep_per_image_s": 0.05}),
    }
    registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])
    big_source = f"s3://{bucket}/big/"
    big = start_submit(env, big_source, "--tasks", "moderation")  # 60 chunks, normal
    wait_for(lambda: job_in_lane(registry, big_source) is not None, 60, "the big job")
    big_id = job_in_lane(registry, big_source).id
    worker = start_worker(env, tmp_path / "worker.log").wait_ready()
    workers.append(worker)
    wait_for(lambda: registry.get(big_id).chunks_done >= 1, 120, "the big job to be under way")

    # the small job through the Python API, in this process: 3 chunks, normal like the big one
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    small_source = f"s3://{bucket}/small/"
    submitted: list[str] = []
    settings = Settings()
    producer = threading.Thread(
        target=lambda: submitted.append(submit(small_source, tasks="moderation", priority="normal", settings=settings))
    )
    producer.start()
    race = watch_race(registry, big_id, small_source, 3, 120)
    producer.join(timeout=30)
    assert submitted == [race.short.id]
    assert race.short.state == JobState.DONE and race.short.lane == Lane.NORMAL
    assert race.long_state_when_short_finished == JobState.RUNNING
    done_meanwhile = race.long_done_when_short_finished - race.long_done_when_short_was_queued
    assert done_meanwhile <= 3 + 1, race  # a turn each, the lane's two places and the running chunk
    assert race.long_done_when_short_finished <= 60 - 20, race  # well before the big one

    # the worker's log, in order: from the small job's first chunk to its last, the two alternate
    order = re.findall(r"chunk ([0-9a-f]{12})/\d+: annotated", worker.log)
    first, last = order.index(race.short.id), len(order) - order[::-1].index(race.short.id) - 1
    between = order[first : last + 1]
    assert between.count(big_id) <= between.count(race.short.id), between
    assert big.wait(timeout=180) == 0
    wait_for(lambda: registry.state(big_id) == JobState.DONE, 180, "the big job to finish")
    assert len(rows(pg_url, big_id)) == 120 and len(rows(pg_url, race.short.id)) == 6


def test_a_retried_chunk_goes_back_to_its_own_lane(
    dist_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    """A transient fault mid-chunk: Celery's retry sends the chunk again, into the backfill lane's
    list (Redis keyspace events name the list of every push), and the job ends with one record per image."""
    upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "flaky/", 4)
    flag = tmp_path / "failed-once"
    faults = {"fail_once_on_uri": "flaky/p0002", "fail_once_flag": str(flag)}
    env = {**dist_env, "IMAGEMILL_TEST_FAULTS": json.dumps(faults)}
    pushes = ListPushes(env["IMAGEMILL_BROKER_URL"])
    result = run_cli(
        "submit", f"s3://{bucket}/flaky/", "--tasks", "moderation", "--chunk-size", "4", "--priority", "backfill",
        env=env,
    )  # fmt: skip
    job_id = job_id_of(result.stdout)
    workers.append(start_worker(env, tmp_path / "worker.log").wait_ready())
    registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])
    wait_for(lambda: registry.state(job_id) != JobState.RUNNING, 120, "the job to end")
    assert flag.exists() and "retry" in workers[0].log.lower()
    backfill_list = lane_list("imagemill", Lane.BACKFILL)  # kombu's list for priority step 6
    assert pushes.stop() == [backfill_list, backfill_list]  # sent, then sent again by the retry
    job = registry.get(job_id)
    assert job.state == JobState.DONE and (job.annotated, job.chunks_done) == (4, 1)
    assert len(rows(pg_url, job_id)) == 4


def test_a_chunk_handed_back_by_a_stopping_worker_goes_back_to_its_own_lane(
    dist_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    """SIGTERM with a chunk running past IMAGEMILL_SOFT_SHUTDOWN_TIMEOUT: the chunk goes back,
    unwritten, onto the backfill lane's list; the next worker writes it once."""
    keys = upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "handback/", 4)
    env = {
        **dist_env,
        "IMAGEMILL_SOFT_SHUTDOWN_TIMEOUT": "1",
        "IMAGEMILL_VISIBILITY_TIMEOUT": "4",
        "IMAGEMILL_TEST_FAULTS": json.dumps({"sleep_per_image_s": 3}),
    }
    pushes = ListPushes(env["IMAGEMILL_BROKER_URL"])
    result = run_cli(
        "submit", f"s3://{bucket}/handback/", "--tasks", "moderation", "--chunk-size", "4", "--priority", "backfill",
        env=env,
    )  # fmt: skip
    job_id = job_id_of(result.stdout)
    registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])
    first = start_worker(env, tmp_path / "first.log")
    workers.append(first)
    wait_for(lambda: registry.get(job_id).started_at is not None, 90, "the chunk to start")
    assert first.stop(timeout=90) == 0
    assert rows(pg_url, job_id) == [] and registry.get(job_id).chunks_done == 0  # handed back unwritten
    workers.append(start_worker({**env, "IMAGEMILL_TEST_FAULTS": "{}"}, tmp_path / "second.log"))
    wait_for(lambda: registry.state(job_id) != JobState.RUNNING, 120, "the job to end")
    backfill_list = lane_list("imagemill", Lane.BACKFILL)
    assert pushes.stop() == [backfill_list, backfill_list]  # sent, then handed back to the same lane
    assert registry.get(job_id).state == JobState.DONE
    assert sorted(uri for uri, *_ in rows(pg_url, job_id)) == sorted(f"s3://{bucket}/{k}" for k in keys)


def test_refs_with_an_upload_time_get_upload_to_record_and_queue_wait_in_metrics_and_status(
    dist_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    """Refs that carry their upload event's time (as `imagemill watch` enqueues them): the worker
    observes event-to-record for each and the queue wait for each chunk, by lane, on /metrics and in
    the registry `status` reads."""
    keys = upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "uploads/", 4)
    port = free_port()
    env = {**dist_env, "IMAGEMILL_METRICS_PORT": str(port), "IMAGEMILL_METRICS_ADDR": "127.0.0.1"}
    worker = start_worker(env, tmp_path / "worker.log").wait_ready()
    workers.append(worker)
    uploaded_at = time.time() - 2  # the events say the objects arrived two seconds ago
    refs = tuple(ImageRef(uri=f"s3://{bucket}/{key}", event_time=uploaded_at) for key in keys)
    settings = Settings(broker_url=env["IMAGEMILL_BROKER_URL"], chunk_size=2)
    with (
        JobRegistry(env["IMAGEMILL_BROKER_URL"]) as registry,
        Submission(
            RefListSource("uploads", refs), (Task.MODERATION,), pg_url, settings, registry, lane=Lane.URGENT
        ) as sub,
    ):
        job, _ = sub.register()
        assert sub.run() == 2
        wait_for(lambda: registry.state(job.id) != JobState.RUNNING, 120, "the job to end")
        upload_to_record = registry.latencies("upload_to_record", job_id=job.id)
        assert len(upload_to_record) == 4 and all(2 <= s < 120 for s in upload_to_record)
        assert registry.latencies("upload_to_record", lane=Lane.URGENT) == upload_to_record
        assert len(registry.latencies("queue_wait", job_id=job.id)) == 2
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("imagemill_upload_to_record_seconds_count", frozenset({("lane", "urgent")}))] == 4
    assert samples[("imagemill_queue_wait_seconds_count", frozenset({("lane", "urgent")}))] == 2
    assert len(rows(pg_url, job.id)) == 4
