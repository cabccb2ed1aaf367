"""The job registry: counters exact under concurrency and redelivery, states that end the job."""

from concurrent.futures import ThreadPoolExecutor

from imagemill.core.jobs import JobRegistry, JobState
from imagemill.core.schemas import Task


def new_job(registry: JobRegistry, job_id: str = "job1"):
    job, created = registry.create(job_id, "s3://b/p", (Task.CAPTION,), "postgresql://u:secret@db/x", "imagemill")
    assert created
    return job


def test_each_chunk_counts_once_even_when_delivered_many_times_concurrently(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    deliveries = [f"job1/{i:06d}" for i in range(50)] * 4  # every chunk delivered four times
    with ThreadPoolExecutor(8) as pool:
        firsts = list(pool.map(lambda c: registry.chunk_done("job1", c, {"annotated": 3, "truncated": 1}), deliveries))
    assert sum(firsts) == 50
    job = registry.get("job1")
    assert (job.chunks_done, job.annotated, job.failed, job.failed_by_kind) == (50, 150, 50, {"truncated": 50})


def test_a_job_is_done_only_when_listing_ended_and_every_chunk_is_accounted_for(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    registry.add_queued("job1", listed=4, queued=4)
    registry.add_queued("job1", listed=2, queued=2)
    registry.chunk_done("job1", "job1/000000", {"annotated": 4})
    registry.chunk_done("job1", "job1/000001", {"annotated": 2})
    assert registry.state("job1") == JobState.RUNNING  # the producer might still be listing
    registry.end_listing("job1", 2)
    assert registry.state("job1") == JobState.DONE
    job = registry.get("job1")
    assert job.finished_at is not None


def test_workers_finishing_before_the_listing_ends_still_close_the_job(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    registry.end_listing("job1", 1)
    assert registry.state("job1") == JobState.RUNNING
    registry.chunk_done("job1", "job1/000000", {"annotated": 1})
    assert registry.state("job1") == JobState.DONE


def test_cancel_is_final_and_only_from_running(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    assert registry.cancel("job1") is True
    assert registry.cancel("job1") is False
    registry.chunk_cancelled("job1", "job1/000000")
    registry.end_listing("job1", 1)
    job = registry.get("job1")
    assert job.state == JobState.CANCELLED and job.chunks_cancelled == 1


def test_recent_jobs_are_newest_first(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    for name in ("a", "b", "c"):
        new_job(registry, name)
    assert [job.id for job in registry.recent(2)] == ["c", "b"]


def test_the_same_idempotency_key_attaches_to_the_running_job(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    first, created = registry.create("j1", "s3://b/p", (Task.TAGS,), "sink", "q", idempotency_key="k")
    second, again = registry.create("j2", "s3://b/p", (Task.TAGS,), "sink", "q", idempotency_key="k")
    assert created and not again and second.id == "j1"
    registry.cancel("j1")
    third, fresh = registry.create("j3", "s3://b/p", (Task.TAGS,), "sink", "q", idempotency_key="k")
    assert fresh and third.id == "j3"  # a job that ended no longer holds the key


def test_only_a_silent_producer_can_be_taken_over(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    assert registry.take_over("job1", stale_after_s=30) is False  # it just heartbeated
    registry.redis.hset(registry.key("job1"), "producer_seen", 0)
    assert registry.take_over("job1", stale_after_s=30) is True
    assert registry.take_over("job1", stale_after_s=30) is False  # the new producer now owns it
