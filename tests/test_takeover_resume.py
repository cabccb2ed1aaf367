"""A producer taken over mid-listing is resumed after refs that were enqueued or skipped, never after
refs it had not enqueued yet: every object ends with exactly one record.

The incremental skip checks refs in batches; a batch's skipped refs can come after fresh refs of the
same batch that still wait for room in the queue. A producer killed while it waits must not leave a
resume point past them.
"""

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
from tests.fixtures.workers import start_worker

pytestmark = pytest.mark.slow  # workers, producers killed and taken over


def test_a_producer_killed_waiting_for_room_is_resumed_without_skipping_images(
    dist_env, bucket, pg_url, workers, tmp_path: Path
) -> None:
    endpoint = dist_env["IMAGEMILL_S3_ENDPOINT_URL"]
    names = [f"p{i:02d}.jpg" for i in range(20)]
    old, new = names[1::2], names[0::2]  # interleaved in listing order
    env = {**dist_env, "IMAGEMILL_CHUNK_SIZE": "2", "IMAGEMILL_PRODUCER_STALE_S": "2"}
    args = (f"s3://{bucket}/inc/", "--tasks", "moderation")

    # a first job annotates the odd objects and publishes the pipeline's signature
    upload_photos(endpoint, bucket, "inc/", 0, old)
    worker = start_worker(env, tmp_path / "first.log").wait_ready()
    workers.append(worker)
    first = submitted(run_cli("submit", *args, "--wait", env=env, timeout=240))
    worker.stop()

    # another job's chunk fills the queue (no worker runs now)
    upload_photos(endpoint, bucket, "filler/", 1)
    filler = submitted(run_cli("submit", f"s3://{bucket}/filler/", "--tasks", "moderation", env=env))

    # the even objects arrive; a producer lists everything, skips the odd ones (one check batch) and
    # blocks on the full queue before it enqueues its first chunk
    upload_photos(endpoint, bucket, "inc/", 0, new)
    registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])
    blocked_env = {**os.environ, **env, "IMAGEMILL_QUEUE_HIGH_WATER": "1", "PYTHONPATH": str(REPO)}
    producer = subprocess.Popen(
        [sys.executable, "-m", "imagemill", "submit", *args],
        env=blocked_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: len(registry.recent(5)) == 3, 60, "the second job")
        (second,) = [j.id for j in registry.recent(5) if j.id not in (first, filler)]

        def waiting_for_room() -> bool:  # heartbeats, without a chunk enqueued: blocked on backpressure
            job = registry.get(second)
            return job.chunks_queued == 0 and (job.producer_seen or 0) - job.created_at > 2

        wait_for(waiting_for_room, 60, "the producer to wait for room")
    finally:
        producer.send_signal(signal.SIGKILL)
        producer.communicate()
    job = registry.get(second)
    assert job.state == JobState.RUNNING and not job.listing_done

    # a new submit takes the job over, a worker runs it
    workers.append(start_worker(env, tmp_path / "second.log"))
    resumed = run_cli("submit", *args, "--wait", env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert job_id_of(resumed.stdout) == second and "lost its producer; resuming after" in resumed.stderr
    job = registry.get(second)
    assert job.state == JobState.DONE
    wait_for(lambda: registry.state(filler) == JobState.DONE, 60, "the filler job")
    uris = Counter(row[0] for job_id in (first, second) for row in rows(pg_url, job_id))
    expected = [f"s3://{bucket}/inc/{name}" for name in names]
    assert sorted(uris) == sorted(expected), f"never annotated: {sorted(set(expected) - set(uris))}"
    assert max(uris.values()) == 1
    assert (job.queued, job.skipped) == (len(new), len(old))  # counters exact across the takeover
