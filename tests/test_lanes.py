"""Priority lanes and fair share, part by part: the broker's order, backpressure per lane, the fair
turns inside a lane, and what `status`, the metrics and schedules say of them.

The end-to-end promises (an urgent job overtakes a queued backfill on a real worker, two jobs in
one lane interleave, a retried chunk keeps its lane) are in tests/test_lanes_distributed.py.
"""

import base64
import json
import threading
import time
from pathlib import Path

import pytest
from kombu import Consumer, Queue
from redbeat import RedBeatSchedulerEntry
from typer.testing import CliRunner

from imagemill.cli import app as cli_app
from imagemill.core.broker import CHUNK_TASK, lane_depth, lane_list, make_celery, queue_depth
from imagemill.core.errors import UserError
from imagemill.core.jobs import JobRegistry, JobState
from imagemill.core.lanes import DEFAULT_LANE, Lane, parse_lane
from imagemill.core.schemas import ChunkMessage, ImageRef
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task
from imagemill.pipeline.sources import RefListSource
from imagemill.producer.beat import SCHEDULE_KEY_PREFIX, make_producer_app
from imagemill.producer.scans import scan
from imagemill.producer.schedules import list_schedules
from imagemill.producer.submit import Submission
from tests.fixtures.cli import run_cli
from tests.fixtures.images import write_photos


def refs(prefix: str, count: int) -> tuple[ImageRef, ...]:
    return tuple(ImageRef(uri=f"s3://b/{prefix}{i:04d}.jpg", etag=f"e{i}") for i in range(count))


def send(settings: Settings, queue: str, lane: Lane, label: str) -> None:
    """One chunk message of `lane` into `queue`, as a producer sends it; `label` is its job id."""
    chunk = ChunkMessage(job_id=label, chunk_id=f"{label}/000000", tasks=(Task.MODERATION,), refs=list(refs(label, 1)))
    celery = make_celery(settings)
    try:
        message = chunk.model_copy(update={"lane": lane}).model_dump(mode="json")
        celery.send_task(CHUNK_TASK, args=[message], queue=queue, priority=lane.priority)
    finally:
        celery.close()


# ---------------------------------------------------------------------------------------------- the broker


def test_a_consumer_takes_every_urgent_chunk_then_normal_then_backfill_whatever_order_they_came_in(
    redis_url: str,
) -> None:
    """Two routed queues, chunks sent lowest lane first: a consumer with one message in hand at a
    time (prefetch 1, acknowledged when done, as the workers run) takes them lane by lane, through
    the same BRPOP kombu's Redis transport issues for a worker."""
    settings = Settings(broker_url=redis_url, routes={"caption": "imagemill-caption"})
    sent = [
        ("imagemill", Lane.BACKFILL, "b1"),
        ("imagemill-caption", Lane.BACKFILL, "b2"),
        ("imagemill", Lane.NORMAL, "n1"),
        ("imagemill-caption", Lane.NORMAL, "n2"),
        ("imagemill-caption", Lane.URGENT, "u1"),
        ("imagemill", Lane.URGENT, "u2"),
    ]
    for queue, lane, label in sent:
        send(settings, queue, lane, label)
    taken: list[tuple[str, str]] = []
    celery = make_celery(settings)
    with celery.connection_for_read() as connection:

        def received(body: list, message: object) -> None:
            args = body[0] if isinstance(body, list) else json.loads(body)[0]
            taken.append((args[0]["lane"], args[0]["job_id"]))
            message.ack()  # type: ignore[attr-defined]

        queues = [Queue("imagemill"), Queue("imagemill-caption")]
        with Consumer(connection, queues=queues, callbacks=[received], accept=["json"], prefetch_count=1):
            deadline = time.monotonic() + 20
            while len(taken) < len(sent) and time.monotonic() < deadline:
                try:
                    connection.drain_events(timeout=1)
                except TimeoutError:
                    pass
    celery.close()
    assert [lane for lane, _ in taken] == ["urgent", "urgent", "normal", "normal", "backfill", "backfill"], taken
    assert {label for _, label in taken} == {label for *_, label in sent}


def test_each_lane_has_its_own_list_and_the_queue_depth_counts_them_all(redis_url: str) -> None:
    settings = Settings(broker_url=redis_url)
    for lane, count in ((Lane.URGENT, 1), (Lane.NORMAL, 2), (Lane.BACKFILL, 3)):
        for i in range(count):
            send(settings, "imagemill", lane, f"{lane.value}{i}")
    client = JobRegistry(redis_url).redis
    assert [lane_depth(client, "imagemill", lane) for lane in Lane] == [1, 2, 3]
    assert queue_depth(client, "imagemill") == 6
    assert lane_list("imagemill", Lane.URGENT) == "imagemill"  # KEDA's listName for the urgent lane


# ---------------------------------------------------------------------------------------------- backpressure


def submission(
    redis_url: str, tmp_path: Path, lane: Lane, images: int, *, high_water: int = 2, share: int = 1, name: str = "job"
) -> Submission:
    settings = Settings(broker_url=redis_url, queue_high_water=high_water, chunk_size=1)
    (tmp_path / "out").mkdir(exist_ok=True)
    registry = JobRegistry(redis_url)
    source = RefListSource(name, refs(name, images))
    return Submission(source, (Task.MODERATION,), f"file://{tmp_path}/out/", settings, registry, lane=lane, share=share)


def test_a_full_backfill_lane_does_not_hold_up_an_urgent_submit(redis_url: str, tmp_path: Path) -> None:
    backfill = submission(redis_url, tmp_path, Lane.BACKFILL, 10, name="backfill")
    backfill.register()
    producing = threading.Thread(target=backfill.run, daemon=True)
    producing.start()
    client = backfill.backpressure.client
    deadline = time.monotonic() + 20
    while lane_depth(client, "imagemill", Lane.BACKFILL) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lane_depth(client, "imagemill", Lane.BACKFILL) == 2  # full to its mark, and its producer waits

    with submission(redis_url, tmp_path, Lane.URGENT, 2, name="urgent") as urgent:
        job, created = urgent.register()
        started = time.monotonic()
        assert urgent.run() == 2
        assert time.monotonic() - started < 5  # not held by the full backfill lane
    assert created and job.lane == Lane.URGENT
    assert lane_depth(client, "imagemill", Lane.URGENT) == 2
    assert lane_depth(client, "imagemill", Lane.BACKFILL) == 2 and producing.is_alive()
    backfill.registry.cancel(backfill.job_id)  # the waiting producer stops
    producing.join(timeout=10)
    assert not producing.is_alive()
    backfill.close()


def test_a_submission_attached_to_a_running_job_keeps_that_jobs_lane(redis_url: str, tmp_path: Path) -> None:
    with submission(redis_url, tmp_path, Lane.BACKFILL, 3, name="same") as first:
        first.register()
    with submission(redis_url, tmp_path, Lane.URGENT, 3, name="same", share=4) as again:
        job, created = again.register()
    assert not created and job.lane == Lane.BACKFILL and job.share == 1 and again.lane == Lane.BACKFILL


# ---------------------------------------------------------------------------------------------- fair share


def registered(registry: JobRegistry, job_id: str, lane: Lane = Lane.NORMAL, share: int = 1) -> None:
    registry.create(
        job_id, f"s3://b/{job_id}/", (Task.MODERATION,), "file:///out/", "imagemill", lane=lane, share=share
    )


def queued(registry: JobRegistry, job_id: str, chunks: int) -> None:
    for _ in range(chunks):
        registry.add_queued(job_id, listed=1, queued=1)


def test_a_lone_job_always_has_its_turn(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    registered(registry, "big")
    queued(registry, "big", 50)
    assert registry.fair_turn("big", "imagemill", Lane.NORMAL, 30)


def test_the_job_with_fewer_chunks_in_flight_takes_the_room_until_they_are_even(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    registered(registry, "big")
    queued(registry, "big", 5)
    registered(registry, "small")
    assert registry.fair_turn("big", "imagemill", Lane.NORMAL, 30)  # alone until the small one asks
    assert registry.fair_turn("small", "imagemill", Lane.NORMAL, 30)
    assert not registry.fair_turn("big", "imagemill", Lane.NORMAL, 30)  # 5 in flight against 0
    queued(registry, "small", 5)
    assert registry.fair_turn("big", "imagemill", Lane.NORMAL, 30)  # even: a turn each
    assert registry.fair_turn("small", "imagemill", Lane.NORMAL, 30)
    registry.chunk_done("big", "big/000000", {"annotated": 1})  # the big one's chunk done: 4 against 5
    assert not registry.fair_turn("small", "imagemill", Lane.NORMAL, 30)
    # other lanes are not asked: an urgent job with nothing in flight does not hold up a normal one
    registered(registry, "urgent", lane=Lane.URGENT)
    assert registry.fair_turn("urgent", "imagemill", Lane.URGENT, 30)
    assert registry.fair_turn("big", "imagemill", Lane.NORMAL, 30)


def test_of_two_jobs_tied_in_flight_the_one_whose_turn_is_older_goes_whichever_asks_first(redis_url: str) -> None:
    """A producer that polls faster (or runs on a less loaded host) still gets only its share."""
    registry = JobRegistry(redis_url)
    registered(registry, "quick")
    registered(registry, "slow")
    queued(registry, "quick", 1)
    queued(registry, "slow", 1)
    assert registry.fair_turn("quick", "imagemill", Lane.NORMAL, 30)  # alone in the lane so far
    assert registry.fair_turn("slow", "imagemill", Lane.NORMAL, 30)  # its first turn
    assert registry.fair_turn("quick", "imagemill", Lane.NORMAL, 30)  # its turn is the older one
    assert not registry.fair_turn("quick", "imagemill", Lane.NORMAL, 30)  # still tied: the slow one's turn
    assert registry.fair_turn("slow", "imagemill", Lane.NORMAL, 30)
    assert registry.fair_turn("quick", "imagemill", Lane.NORMAL, 30)
    registry.leave_lane("slow", "imagemill", Lane.NORMAL)  # alone again: every turn is its own
    assert registry.fair_turn("quick", "imagemill", Lane.NORMAL, 30)
    assert registry.fair_turn("quick", "imagemill", Lane.NORMAL, 30)


def test_a_share_of_three_keeps_three_times_the_chunks_in_flight(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    registered(registry, "heavy", share=3)
    registered(registry, "light")
    queued(registry, "light", 2)
    assert registry.fair_turn("light", "imagemill", Lane.NORMAL, 30)
    queued(registry, "heavy", 5)
    assert registry.fair_turn("heavy", "imagemill", Lane.NORMAL, 30)  # 5 / 3 < 2
    assert not registry.fair_turn("light", "imagemill", Lane.NORMAL, 30)
    queued(registry, "heavy", 2)
    assert not registry.fair_turn("heavy", "imagemill", Lane.NORMAL, 30)  # 7 / 3 > 2
    assert registry.fair_turn("light", "imagemill", Lane.NORMAL, 30)


def test_a_job_that_stopped_sending_holds_no_one_up(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    for job_id in ("ended", "listed", "silent", "asking"):
        registered(registry, job_id)
    queued(registry, "asking", 3)
    for job_id in ("ended", "listed", "silent"):
        assert registry.fair_turn(job_id, "imagemill", Lane.NORMAL, 30)
    registry.cancel("ended")
    registry.end_listing("listed", 0)
    registry.redis.zadd(registry.lane_key("imagemill", Lane.NORMAL), {"silent": time.time() - 60})  # its producer died
    assert registry.fair_turn("asking", "imagemill", Lane.NORMAL, 30)
    assert registry.redis.zrange(registry.lane_key("imagemill", Lane.NORMAL), 0, -1) == ["asking"]
    registry.leave_lane("asking", "imagemill", Lane.NORMAL)
    assert registry.redis.zcard(registry.lane_key("imagemill", Lane.NORMAL)) == 0


def test_two_producers_in_one_lane_send_their_chunks_in_turns(redis_url: str, tmp_path: Path) -> None:
    """With no worker draining, each producer may send only while its job has the fewest chunks in
    flight: the lane holds both jobs' chunks evenly, whatever the order they started in."""
    big = submission(redis_url, tmp_path, Lane.NORMAL, 40, high_water=1000, name="big")
    small = submission(redis_url, tmp_path, Lane.NORMAL, 40, high_water=1000, name="small")
    big.register()
    small.register()
    big.registry.add_queued(big.job_id, listed=0, queued=1)  # one chunk ahead already
    assert small.registry.fair_turn(small.job_id, small.queue, small.lane, 30)  # alone in the lane yet
    assert not big.registry.fair_turn(big.job_id, big.queue, big.lane, 30)  # one in flight against none
    threads = [threading.Thread(target=p.run, daemon=True) for p in (big, small)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    state = {p.job_id: p.registry.get(p.job_id) for p in (big, small)}
    assert all(job is not None and job.listing_done for job in state.values())
    # the lane's list, oldest first: the two jobs alternate (a tie lets both send, so runs of two at most)
    messages = big.backpressure.client.lrange(lane_list("imagemill", Lane.NORMAL), 0, -1)[::-1]
    jobs = [chunk_of(m)["job_id"] for m in messages]
    assert sorted(jobs) == sorted([big.job_id] * 40 + [small.job_id] * 40)
    longest = max(len(run) for run in _runs(jobs))
    assert longest <= 2, jobs
    for p in (big, small):
        p.close()


def chunk_of(message: bytes) -> dict:
    """The chunk of a kombu message as the Redis list holds it (a JSON envelope, its body base64 JSON)."""
    envelope = json.loads(message)
    return json.loads(base64.b64decode(envelope["body"]))[0][0]


def _runs(items: list[str]) -> list[list[str]]:
    runs: list[list[str]] = []
    for item in items:
        if runs and runs[-1][0] == item:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


# ---------------------------------------------------------------------------------------------- the parts


def test_a_lane_is_named_in_any_case_and_a_wrong_name_lists_the_lanes() -> None:
    assert parse_lane("URGENT") is Lane.URGENT and DEFAULT_LANE is Lane.NORMAL
    with pytest.raises(UserError, match=r"priority 'soon': expected one of urgent\|normal\|backfill"):
        parse_lane("soon")
    # kombu serves priority 0 first: urgent before normal before backfill
    assert Lane.URGENT.priority < Lane.NORMAL.priority < Lane.BACKFILL.priority


def test_a_chunk_message_says_its_lane_and_enqueue_time_and_an_event_time_only_when_there_is_one() -> None:
    chunk = ChunkMessage(
        job_id="j",
        chunk_id="j/000001",
        tasks=(Task.MODERATION,),
        refs=[ImageRef(uri="s3://b/a.jpg"), ImageRef(uri="s3://b/b.jpg", event_time=1_700_000_000.5)],
        lane=Lane.URGENT,
        enqueued_at=1_700_000_001.0,
    )
    dumped = chunk.model_dump(mode="json")
    assert dumped["lane"] == "urgent" and dumped["enqueued_at"] == 1_700_000_001.0
    assert "event_time" not in dumped["refs"][0] and dumped["refs"][1]["event_time"] == 1_700_000_000.5
    assert ChunkMessage.model_validate(dumped) == chunk
    # a message from a producer older than the lanes is a normal one, without a queue wait
    old = ChunkMessage.model_validate({k: v for k, v in dumped.items() if k not in {"lane", "enqueued_at"}})
    assert old.lane == Lane.NORMAL and old.enqueued_at is None


def test_submit_refuses_an_unknown_priority_in_one_line(tmp_path: Path) -> None:
    result = run_cli("submit", str(tmp_path), "--sink", f"file://{tmp_path}/", "--priority", "asap", env={})
    assert result.returncode == 2
    assert "expected one of urgent|normal|backfill" in result.stderr


def test_status_and_jobs_show_the_lane_the_share_and_the_latencies(redis_url: str) -> None:
    registry = JobRegistry(redis_url)
    registered(registry, "a1b2c3d4e5f6", lane=Lane.URGENT, share=2)
    registry.add_latencies("a1b2c3d4e5f6", Lane.URGENT, "queue_wait", [float(n) for n in range(1, 101)])
    env = {"IMAGEMILL_BROKER_URL": redis_url}
    status = run_cli("status", "a1b2c3d4e5f6", "--json", env=env)
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    assert document["lane"] == "urgent" and document["share"] == 2
    assert document["latency"]["queue_wait"]["job"] == {"p50": 50.0, "p95": 95.0, "samples": 100}
    assert document["latency"]["queue_wait"]["lane"]["samples"] == 100
    assert document["latency"]["upload_to_record"]["job"] == {"p50": None, "p95": None, "samples": 0}
    table = run_cli("status", "a1b2c3d4e5f6", env={**env, "COLUMNS": "200"})
    assert "urgent (share 2)" in table.stdout and "p95 95.00 s" in table.stdout
    listing = run_cli("jobs", "--json", env=env)
    assert [(j["lane"], j["share"]) for j in json.loads(listing.stdout)] == [("urgent", 2)]
    assert registry.get("a1b2c3d4e5f6").state == JobState.RUNNING


def test_a_schedules_priority_is_stored_and_each_firings_job_goes_to_that_lane(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "photos"
    write_photos(folder, 2, 32, 24)
    (tmp_path / "out").mkdir()
    monkeypatch.setenv("IMAGEMILL_BROKER_URL", redis_url)
    sink = f"file://{tmp_path}/out/"
    args = ["schedule", "add", "nightly", str(folder), "--tasks", "moderation", "--sink", sink]
    refused = CliRunner().invoke(cli_app, [*args, "--priority", "later"])
    assert refused.exit_code == 2 and "expected one of urgent|normal|backfill" in refused.output
    added = CliRunner().invoke(cli_app, [*args, "--priority", "backfill"])
    assert added.exit_code == 0, added.output
    celery = make_producer_app(Settings(broker_url=redis_url))
    (listed,) = list_schedules(celery)
    assert listed.lane == Lane.BACKFILL
    entry = RedBeatSchedulerEntry.from_key(f"{SCHEDULE_KEY_PREFIX}nightly", app=celery)
    fired = scan(*entry.args)  # what beat's worker runs when the schedule fires
    job = JobRegistry(redis_url).get(fired["job_id"])
    assert job is not None and job.lane == Lane.BACKFILL and fired["chunks"] == 1
    client = JobRegistry(redis_url).redis
    assert lane_depth(client, "imagemill", Lane.BACKFILL) == 1 and lane_depth(client, "imagemill", Lane.NORMAL) == 0
    # a schedule stored before the lanes (four arguments) fires into the default lane
    JobRegistry(redis_url).cancel(job.id)
    old = scan(*entry.args[:4])
    assert JobRegistry(redis_url).get(old["job_id"]).lane == Lane.NORMAL
