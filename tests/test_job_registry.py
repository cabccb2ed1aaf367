"""The job registry: counters exact under concurrency and redelivery, states that end the job."""

import json
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from imagemill.core import jobs
from imagemill.core.connections import PROBE_TIMEOUT_S, RETRIES, check_reachable, redis_client
from imagemill.core.errors import SourceError, UserError
from imagemill.core.jobs import Job, JobRegistry, JobState, new_job_id
from imagemill.core.lanes import Lane
from imagemill.core.pipeline_key import pipeline_key
from imagemill.core.rates import RateSample, read_from_redis
from imagemill.core.schemas import ImageRef, Record
from imagemill.core.settings import Settings
from imagemill.core.sinks import Key, SinkContext
from imagemill.core.tasks import Task
from imagemill.pipeline.sources import RefListSource
from imagemill.producer import submit
from imagemill.producer.submit import Submission
from tests.fixtures.s3 import free_port


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
    assert registry.get("job1").skipped == 0
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
    _, created = registry.create("j1", "s3://b/p", (Task.TAGS,), "sink", "q", idempotency_key="k")
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


def test_a_producer_silent_for_exactly_the_stale_time_is_taken_over(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    registry.redis.hset(registry.key("job1"), "producer_seen", 1000.0)
    monkeypatch.setattr(jobs.time, "time", lambda: 1030.0)
    assert registry.take_over("job1", stale_after_s=30.000001) is False
    assert registry.take_over("job1", stale_after_s=30) is True


def test_a_heartbeat_keeps_a_producer_from_being_taken_over(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    registry.redis.hset(registry.key("job1"), "producer_seen", 0)
    registry.heartbeat("job1")
    assert registry.take_over("job1", stale_after_s=30) is False
    assert registry.get("job1").producer_seen > 0


def test_a_producer_that_finished_listing_is_never_taken_over(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    assert registry.get("job1").listing_done is False
    registry.redis.hset(registry.key("job1"), "producer_seen", 0)
    registry.end_listing("job1", 1)
    assert registry.get("job1").listing_done is True
    assert registry.take_over("job1", stale_after_s=30) is False


def test_only_chunks_that_queued_images_count_as_queued_chunks(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    registry.add_queued("job1", listed=5, queued=0, skipped=5)  # everything was annotated before
    registry.add_queued("job1", listed=5, queued=3, skipped=2)
    registry.add_queued("job1", listed=5, queued=5, last_uri="s3://b/p/9.jpg")
    job = registry.get("job1")
    assert (job.listed, job.queued, job.skipped, job.chunks_queued) == (15, 8, 7, 2)
    assert job.resume_after == "s3://b/p/9.jpg"


def test_attempts_count_only_deliveries_that_died_mid_chunk(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    assert registry.begin_attempt("job1", "job1/000000") == 1
    assert registry.begin_attempt("job1", "job1/000000") == 2  # the first delivery never ended: it died
    registry.end_attempt("job1", "job1/000000")
    assert registry.begin_attempt("job1", "job1/000000") == 2  # an attempt that ended is not a death
    assert registry.begin_attempt("job1", "job1/000001") == 1  # each chunk counts its own


def test_a_job_created_without_a_share_weighs_one_in_its_lanes_fair_share(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    assert new_job(registry).share == 1 and registry.get("job1").share == 1
    registry.create("job2", "s3://b/p", (Task.CAPTION,), "postgresql://u:secret@db/x", "imagemill", share=3)
    assert registry.get("job2").share == 3


def test_latency_samples_keep_the_newest_thousand_for_the_job_and_for_its_lane(redis_url: str) -> None:
    """However they arrive (the separate call, a delivery's end, its beginning), a kind's samples are
    the newest 1,000, newest first, for the job and for its lane alike."""
    registry = JobRegistry(redis_url)
    new_job(registry)
    registry.add_latencies("job1", Lane.URGENT, "upload_to_record", [float(i) for i in range(1005)])
    registry.begin_chunk("job1", "job1/000000", "sig-a", Lane.URGENT, queue_wait_s=0.5)
    registry.end_chunk("job1", "job1/000000", {"annotated": 1}, lane=Lane.URGENT, upload_to_record_s=[2000.0, 2001.0])
    for owner in ({"job_id": "job1"}, {"lane": Lane.URGENT}):
        samples = registry.latencies("upload_to_record", **owner)
        assert (len(samples), samples[:3], samples[-1]) == (1000, [2001.0, 2000.0, 1004.0], 7.0)
    for i in range(1001):
        registry.begin_chunk("job1", f"job1/{i + 1:06d}", "sig-a", Lane.URGENT, queue_wait_s=float(i))
    for owner in ({"job_id": "job1"}, {"lane": Lane.URGENT}):
        samples = registry.latencies("queue_wait", **owner)
        assert (len(samples), samples[0], samples[-1]) == (1000, 1000.0, 1.0)


def test_a_delivery_begins_and_ends_in_one_step_each_with_what_the_separate_calls_do(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    assert registry.begin_chunk("job1", "job1/000000", "sig-a", Lane.URGENT, queue_wait_s=0.25) == 1
    assert registry.begin_chunk("job1", "job1/000001", "sig-b", Lane.URGENT) == 1  # no queue wait known
    job = registry.get("job1")
    assert job.started_at is not None and job.signature == "sig-a"
    assert registry.latencies("queue_wait", job_id="job1") == [0.25]
    assert registry.latencies("queue_wait", lane=Lane.URGENT) == [0.25]
    rate = RateSample("caption", images=2, seconds=0.5, where="worker", at=1.0)
    for _ in range(2):  # the second is a redelivery: counted once, its upload latencies kept once
        registry.begin_chunk("job1", "job1/000000", "sig-a", Lane.URGENT)
        counted = registry.end_chunk(
            "job1",
            "job1/000000",
            {"annotated": 2},
            lane=Lane.URGENT,
            figures={"images": 2.0, "wall_s": 0.5},
            worker="host:1",
            upload_to_record_s=[1.5, 2.5],
            rate=rate,
        )
    assert counted is False
    job = registry.get("job1")
    assert (job.annotated, job.chunks_done, job.accounting["images"], job.workers["host:1"]["wall_s"]) == (2, 1, 2, 0.5)
    assert job.chunks_dead_lettered == 0  # an end that does not say dead-lettered is not one
    assert sorted(registry.latencies("upload_to_record", job_id="job1")) == [1.5, 2.5]
    assert sorted(registry.latencies("upload_to_record", lane=Lane.URGENT)) == [1.5, 2.5]
    assert read_from_redis(registry.redis, "caption") == [rate, rate]  # one per delivery: each one ran
    # every delivery ended: none counts as a death; an end sent again never leaves a negative count
    registry.end_attempt("job1", "job1/000000")
    assert registry.begin_chunk("job1", "job1/000000", "sig-a", Lane.URGENT) == 1


def test_a_failed_chunk_outcome_is_counted_by_kind_and_a_dead_letter_by_itself(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    # outcome names are compared by value: these come from JSON, not from the registry's own literals
    registry.chunk_done("job1", "job1/000000", json.loads('{"annotated": 2, "not_an_image": 1, "too_large": 0}'))
    registry.chunk_done("job1", "job1/000001", {"worker_lost": 2}, dead_lettered=True)
    job = registry.get("job1")
    assert (job.annotated, job.failed, job.processed, job.chunks_done, job.chunks_dead_lettered) == (2, 3, 5, 2, 1)
    assert job.failed_by_kind == {"not_an_image": 1, "worker_lost": 2}  # a kind counted zero is not shown


def test_a_failed_job_keeps_its_reason_and_ends_once(redis_url: str) -> None:
    registry = JobRegistry(redis_url, retention_s=60)
    new_job(registry)
    assert registry.fail("job1", "AccessDenied on s3://b/p") is True
    assert registry.fail("job1", "a second reason") is False
    assert registry.cancel("job1") is False
    job = registry.get("job1")
    assert (job.state, job.error, job.retention_s) == (JobState.FAILED, "AccessDenied on s3://b/p", 60)
    assert job.expires_at == job.finished_at + 60


def test_the_first_chunk_sets_the_start_and_the_signature_once(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    assert registry.get("job1").started_at is None and registry.get("job1").expires_at is None
    registry.chunk_started("job1", "sig-a")
    first = registry.get("job1")
    registry.chunk_started("job1", "sig-b")
    again = registry.get("job1")
    assert first.started_at is not None and (again.started_at, again.signature) == (first.started_at, "sig-a")


def test_late_writes_never_recreate_a_job_that_expired(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    registry.heartbeat("gone")
    registry.add_queued("gone", listed=1, queued=1)
    registry.chunk_started("gone", "sig")
    assert registry.chunk_done("gone", "gone/000000", {"annotated": 1}) is False
    assert registry.get("gone") is None and registry.state("gone") is None
    assert registry.redis.exists(registry.key("gone")) == 0


def test_a_key_left_pointing_at_a_job_that_is_not_running_is_claimed_afresh(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    registry.create("old", "s3://b/p", (Task.TAGS,), "sink", "q", idempotency_key="k")
    registry.end_listing("old", 0)  # done at once: no chunks
    assert registry.state("old") == JobState.DONE
    for holder in ("old", "expired"):  # as an imagemill that did not release the key leaves it
        registry.redis.hset(jobs.ACTIVE, "k", holder)
        job, fresh = registry.create(f"after-{holder}", "s3://b/p", (Task.TAGS,), "sink", "q", idempotency_key="k")
        assert fresh and job.id == f"after-{holder}"
        registry.cancel(job.id)


def test_a_job_that_vanishes_as_it_is_registered_is_named_in_the_error(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = JobRegistry(redis_url)
    monkeypatch.setattr(registry, "get", lambda job_id: None)  # a Redis flushed between the write and the read
    with pytest.raises(RuntimeError, match=r"^job j9 vanished from the registry at redis://"):
        registry.create("j9", "s3://b/p", (Task.TAGS,), "sink", "q")


def test_recent_lists_twenty_jobs_unless_asked_for_more(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    for number in range(25):
        new_job(registry, f"j{number:02d}")
    assert [job.id for job in registry.recent()] == [f"j{number:02d}" for number in range(24, 4, -1)]
    assert len(registry.recent(3)) == 3 and len(registry.recent(30)) == 25


def test_a_field_stored_empty_reads_as_absent() -> None:
    job = Job.from_hash(
        {
            "id": "j",
            "source": "s",
            "tasks": "tags,caption",
            "sink": "k",
            "queue": "q",
            "state": "running",
            "created_at": "1",
            "finished_at": "5",
            "signature": "",
            "error": "",
            "listing_done": "0",
            "failed:too_large": "0",
        }
    )
    assert (job.signature, job.error, job.tasks, job.listing_done, job.failed_by_kind) == (
        None,
        None,
        (Task.TAGS, Task.CAPTION),
        False,
        {},
    )
    assert job.expires_at is None  # finished by an imagemill that kept no retention: kept until pruned


def test_signatures_and_rejected_messages_are_shared_counters(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    assert registry.signature_for("tags") is None and registry.rejected() == 0
    registry.publish_signature("tags", "abc")
    assert registry.signature_for("tags") == "abc" and registry.signature_for("caption") is None
    assert [registry.count_rejected(), registry.count_rejected()] == [1, 2]
    assert registry.rejected() == 2


def test_job_ids_are_twelve_hex_digits_and_distinct() -> None:
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 12 and int(i, 16) >= 0 for i in ids)


# every Redis client comes from imagemill.core.connections


def test_the_registry_client_decodes_and_waits_out_outages_while_a_probe_never_retries(redis_url: str) -> None:
    with JobRegistry(redis_url) as registry:
        new_job(registry)
        assert registry.redis.hget(registry.key("job1"), "state") == "running"
        assert registry.redis.get_retry().get_retries() == RETRIES
    probe = redis_client(redis_url, probe=True)
    assert probe.get_retry().get_retries() == 0
    assert probe.connection_pool.connection_kwargs["socket_timeout"] == PROBE_TIMEOUT_S
    assert probe.ping() is True
    probe.close()


def test_an_unreachable_redis_is_one_line_without_the_password() -> None:
    with pytest.raises(UserError) as caught:
        check_reachable(f"redis://:s3cretpw@127.0.0.1:{free_port()}/0")
    message = str(caught.value)
    assert message.startswith("cannot reach Redis at redis://:***@127.0.0.1:") and "\n" not in message
    assert "s3cretpw" not in message


# a submission closes the sink it searched for what to skip


class RecordingSink(SinkContext):
    """A searchable sink that holds the first two refs and records how it was left."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def write(self, records: Sequence[Record], chunk: str) -> None:
        raise AssertionError("a producer never writes records")

    def check(self) -> None:
        """Nothing to reach."""

    def existing_keys(self, keys: Iterable[Key]) -> set[Key]:
        self.events.append("existing_keys")
        return {key for key in keys if key[0] in ("s3://b/0.jpg", "s3://b/1.jpg")}

    def close(self) -> None:
        self.events.append("close")

    def abort(self) -> None:
        self.events.append("abort")


@dataclass(frozen=True)
class BreakingSource:
    """Lists `refs`, then fails as a bucket that vanished mid-listing would."""

    refs_before: tuple[ImageRef, ...]

    def refs(self) -> Iterator[ImageRef]:
        yield from self.refs_before
        raise SourceError("cannot list s3://b/: NoSuchBucket")


@pytest.mark.parametrize("breaks", [False, True], ids=["listing-completes", "listing-fails"])
def test_a_submission_closes_the_sink_it_searched_when_the_listing_ends(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, breaks: bool
) -> None:
    settings = Settings(broker_url=redis_url, chunk_size=2)
    tasks = (Task.MODERATION,)
    refs = tuple(ImageRef(uri=f"s3://b/{i}.jpg", etag="e") for i in range(5))
    source = BreakingSource(refs) if breaks else RefListSource("five", refs)
    sinks: list[RecordingSink] = []
    monkeypatch.setattr(submit, "open_sink", lambda url: sinks.append(RecordingSink()) or sinks[-1])
    with JobRegistry(redis_url) as registry:
        registry.publish_signature(pipeline_key(tasks, settings), "sig")
        with Submission(source, tasks, "file:///shared/", settings, registry) as submission:
            job, _ = submission.register()
            if breaks:
                with pytest.raises(SourceError):
                    submission.run()
            else:
                assert submission.run() == 2  # three refs the sink lacks, in chunks of two
        final = registry.get(job.id)
    # the store is searched per thousand refs, so a listing that fails first never searched it
    expected = (["abort"], JobState.FAILED, 0) if breaks else (["existing_keys", "close"], JobState.RUNNING, 2)
    assert final is not None
    assert (sinks[0].events, final.state, final.skipped) == expected


def test_a_chunk_whose_cost_reaches_the_budget_ends_the_job_over_budget_and_chunks_in_flight_still_count(
    redis_url: str,
) -> None:
    registry = JobRegistry(redis_url)
    registry.create("job1", "s3://b/p", (Task.CAPTION,), "postgresql://db/x", "imagemill", budget=1.0)
    registry.add_queued("job1", listed=12, queued=12)
    figures = {"images": 4.0, "wall_s": 0.6, "stage:decode": 0.25, "cost": 0.6}
    assert registry.chunk_done("job1", "job1/000000", {"annotated": 4}, figures=figures, worker="a:1")
    assert registry.state("job1") == JobState.RUNNING  # 0.6 of 1.0
    registry.chunk_done("job1", "job1/000001", {"annotated": 4}, figures=figures, worker="b:2")
    job = registry.get("job1")
    assert job.state == JobState.OVER_BUDGET and job.error == "spent 1.20 of its budget 1.00"
    # a chunk that was running when the job stopped is written whole and counted, its cost too
    assert registry.chunk_done("job1", "job1/000002", {"annotated": 4}, figures=figures, worker="a:1")
    job = registry.get("job1")
    assert job.state == JobState.OVER_BUDGET and job.annotated == 12
    assert job.cost == pytest.approx(1.8) and job.cost_per_1000 == pytest.approx(150.0)
    assert job.figures.images == 12 and job.figures.stage("decode") == pytest.approx(0.75)
    assert job.workers["a:1"]["images"] == 8 and job.workers["b:2"]["cost"] == pytest.approx(0.6)
    # a redelivery adds nothing
    assert not registry.chunk_done("job1", "job1/000002", {"annotated": 4}, figures=figures, worker="a:1")
    assert registry.get("job1").cost == pytest.approx(1.8)


def test_a_running_jobs_budget_can_change_and_the_last_chunk_ends_it_done_not_over_budget(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    assert registry.set_budget("job1", 0.5)
    registry.add_queued("job1", listed=4, queued=4)
    registry.end_listing("job1", 1)
    registry.chunk_done("job1", "job1/000000", {"annotated": 4}, figures={"cost": 2.0})
    assert registry.state("job1") == JobState.DONE  # all its work was done: nothing was stopped
    assert not registry.set_budget("job1", 5.0)


def test_a_job_that_continues_another_keeps_what_that_one_spent_and_starts_from_nothing_without_it(
    redis_url: str,
) -> None:
    registry = JobRegistry(redis_url)
    new_job(registry)
    common = ("s3://b/p", (Task.CAPTION,), "postgresql://db/x", "imagemill")
    after, _ = registry.create("job2", *common, budget=10.0, continues="job1", spent_before=2.5)
    assert (after.continues, after.spent_before, after.budget) == ("job1", 2.5, 10.0)
    unpriced, _ = registry.create("job3", *common, continues="job1")
    assert (unpriced.continues, unpriced.spent_before, unpriced.budget) == ("job1", 0.0, None)
    assert (registry.get("job1").continues, registry.get("job1").spent_before) == (None, 0.0)
