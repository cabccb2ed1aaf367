"""Promises kept by one real worker, in one session: IMAGEMILL_ROUTES, the object and tags sinks
written through the worker, S3 faults met by the worker (through the fault-injecting proxy), a
cancel that lets the running chunk finish, a failed job's queued chunks dropped unread, and the
metrics of chunks that were not run (cancelled, unknown job) scraped from its endpoint.

One worker for all of it: starting a worker is the costly part of a distributed test.
"""

import json
from contextlib import ExitStack
from pathlib import Path

import pytest

from imagemill.core.broker import CHUNK_TASK, make_celery, queue_depth
from imagemill.core.jobs import JobRegistry, JobState, new_job_id
from imagemill.core.schemas import ChunkMessage, ImageRef
from imagemill.core.settings import Settings
from imagemill.core.sinks.files import read_records
from imagemill.core.tasks import Task
from tests.fixtures.cli import run_cli
from tests.fixtures.distributed import submitted, upload_photos, wait_for
from tests.fixtures.faulty_s3 import faulty_proxy
from tests.fixtures.s3 import free_port, s3_client
from tests.fixtures.workers import start_worker
from tests.test_metrics import parse, scrape, value

pytestmark = pytest.mark.slow  # a worker and several jobs

ROUTED = "imagemill-moderation"


def test_a_routed_worker_writes_every_sink_lets_a_cancelled_chunk_finish_and_counts_what_it_dropped(
    dist_env: dict[str, str], bucket: str, workers: list, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        one_worker_session(stack, dist_env, bucket, workers, tmp_path)


def one_worker_session(stack: ExitStack, dist_env: dict[str, str], bucket: str, workers: list, tmp_path: Path) -> None:
    endpoint = dist_env["IMAGEMILL_S3_ENDPOINT_URL"]
    proxy = stack.enter_context(faulty_proxy(endpoint))  # the worker and submit reach S3 through it
    port = free_port()
    env = {
        **dist_env,
        "IMAGEMILL_S3_ENDPOINT_URL": proxy.url,
        "IMAGEMILL_ROUTES": json.dumps({"moderation": ROUTED}),
        "IMAGEMILL_METRICS_PORT": str(port),
        "IMAGEMILL_METRICS_ADDR": "127.0.0.1",
        "IMAGEMILL_TEST_FAULTS": json.dumps({"sleep_per_image_s": 0.4}),  # a chunk of 2 takes ~1 s
        # the folder sinks below are local paths, which a worker writes only when they are listed
        "IMAGEMILL_ALLOWED_SINKS": f"postgresql://,s3://,s3tags://,{tmp_path.as_uri()}",
    }
    # the worker listens on the routed queue only: a job it finishes was sent there
    workers.append(start_worker(env, tmp_path / "worker.log", "--queues", ROUTED).wait_ready())
    registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])
    client = s3_client(endpoint)

    # every kind of sink, written by the worker
    keys = upload_photos(endpoint, bucket, "in/", 2)
    folder = tmp_path / "records"
    folder.mkdir()
    sink_jobs = {}
    for sink in (f"s3://{bucket}/out/", folder.as_uri(), "s3tags://"):
        job_id = submitted(
            run_cli(
                "submit", f"s3://{bucket}/in/", "--tasks", "moderation", "--sink", sink, "--wait", env=env, timeout=120
            )
        )
        assert registry.get(job_id).state == JobState.DONE, sink
        sink_jobs[sink] = job_id
    assert queue_depth(registry.redis, Settings.model_fields["queue"].default) == 0  # nothing went the default way
    written = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/").get("Contents", [])]
    assert written, "no chunk object under the s3:// sink"
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files and sorted(Path(r.uri).name for f in files for r in read_records(f)) == ["p0000.jpg", "p0001.jpg"]
    for key in keys:
        tags = {t["Key"]: t["Value"] for t in client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}
        assert tags.get("imagemill-flagged") in ("true", "false"), tags

    # S3 faults met by the worker: a throttled object is retried and annotated, a denied one is
    # one fetch_failed record at once (a 403 is an answer, never retried)
    upload_photos(endpoint, bucket, "faults/", 0, ["ok.jpg", "slow.jpg", "denied.jpg"])
    proxy.add_rule("GET", "faults/slow.jpg", status=503, code="SlowDown", times=2)
    proxy.add_rule("GET", "faults/denied.jpg", status=403, code="AccessDenied")
    faults_out = tmp_path / "faults"
    faults_out.mkdir()
    args = ("submit", f"s3://{bucket}/faults/", "--tasks", "moderation", "--sink", faults_out.as_uri(), "--wait")
    job_id = submitted(run_cli(*args, env=env, timeout=120))
    records = {Path(r.uri).name: r for f in faults_out.rglob("*") if f.is_file() for r in read_records(f)}
    kinds = {name: (r.error.kind if r.error else None) for name, r in records.items()}
    assert kinds == {"ok.jpg": None, "slow.jpg": None, "denied.jpg": "fetch_failed"}, kinds
    assert "AccessDenied" in records["denied.jpg"].error.message
    assert proxy.count("GET", "faults/slow.jpg") == 3 and proxy.count("GET", "faults/denied.jpg") == 1
    assert registry.get(job_id).state == JobState.DONE

    # cancel while a chunk runs: that chunk finishes and is written, the ones not started are dropped
    upload_photos(endpoint, bucket, "cancel/", 16)  # 8 chunks of ~1 s: most still queued when submit returns
    worker = workers[0]
    received, succeeded = worker.log.count("received"), worker.log.count("succeeded")
    job_id = submitted(
        run_cli("submit", f"s3://{bucket}/cancel/", "--tasks", "moderation", "--chunk-size", "2", env=env)
    )

    def running() -> bool:  # a chunk of this job received and not yet finished
        return worker.log.count("received") - received > worker.log.count("succeeded") - succeeded

    wait_for(running, 60, "a chunk of the job to be running")
    assert registry.cancel(job_id)  # what `imagemill cancel` does, without a process start's delay
    wait_for(
        lambda: (lambda j: j.chunks_done + j.chunks_cancelled == j.chunks_total)(registry.get(job_id)),
        60,
        "every chunk accounted for",
    )
    job = registry.get(job_id)
    assert job.state == JobState.CANCELLED
    assert job.chunks_done >= 1 and job.annotated == 2 * job.chunks_done  # the running chunk completed whole
    assert job.chunks_cancelled >= 1

    # chunks still queued when their job failed (its sink bucket was deleted, say) are dropped before
    # any image is read, and counted as cancelled: not run
    failed_keys = upload_photos(endpoint, bucket, "failed/", 4)
    failed_sink = tmp_path / "failed-sink"
    failed_sink.mkdir()
    failed, _ = registry.create(
        new_job_id(), f"s3://{bucket}/failed/", (Task.MODERATION,), failed_sink.as_uri(), ROUTED
    )
    celery = make_celery(Settings(broker_url=env["IMAGEMILL_BROKER_URL"]))
    queued = [
        ChunkMessage(
            job_id=failed.id,
            chunk_id=f"{failed.id}/{n:06d}",
            tasks=(Task.MODERATION,),
            refs=[ImageRef(uri=f"s3://{bucket}/{key}") for key in failed_keys[2 * n : 2 * n + 2]],
        )
        for n in range(2)
    ]
    assert registry.fail(failed.id, "NoSuchBucket: the sink bucket was deleted")
    for message in queued:
        celery.send_task(CHUNK_TASK, args=[message.model_dump(mode="json")], queue=ROUTED)
    wait_for(
        lambda: (lambda j: j.chunks_done + j.chunks_cancelled == len(queued))(registry.get(failed.id)),
        60,
        "the failed job's queued chunks to be taken",
    )
    failed_job = registry.get(failed.id)
    assert failed_job.state == JobState.FAILED and failed_job.chunks_cancelled == len(queued)
    assert (failed_job.chunks_done, failed_job.annotated, failed_job.failed) == (0, 0, 0)
    assert proxy.count("GET", "failed/") == 0 and proxy.count("HEAD", "failed/") == 0  # no image read
    assert not any(failed_sink.iterdir())

    # a chunk of a job the registry does not know is dropped and counted; a chunk delivered again after
    # it was done (as Redis redelivers an unacknowledged one) is counted once, as redelivered
    unknown = ChunkMessage(
        job_id="nosuchjob0000",
        chunk_id="nosuchjob0000/000001",
        tasks=(Task.MODERATION,),
        refs=[ImageRef(uri=f"s3://{bucket}/{keys[0]}")],
    )
    done_job = sink_jobs[f"s3://{bucket}/out/"]
    (done_chunk,) = (
        c if isinstance(c, str) else c.decode() for c in registry.redis.smembers(JobRegistry.job_keys(done_job)[1])
    )
    again = ChunkMessage(
        job_id=done_job,
        chunk_id=done_chunk,
        tasks=(Task.MODERATION,),
        refs=[ImageRef(uri=f"s3://{bucket}/{k}") for k in keys],
    )
    for message in (unknown, again):
        celery.send_task(CHUNK_TASK, args=[message.model_dump(mode="json")], queue=ROUTED)

    def scraped() -> dict:
        return parse(scrape(port))

    wait_for(
        lambda: (
            value(scraped(), "imagemill_chunks_total", outcome="unknown_job") == 1
            and value(scraped(), "imagemill_chunks_total", outcome="redelivered") == 1
        ),
        60,
        "the unknown job's and the redelivered chunk on the metrics",
    )
    samples = scraped()
    assert "belongs to no known job" in worker.log
    cancelled = job.chunks_cancelled + failed_job.chunks_cancelled  # a failed job's dropped chunks count as cancelled
    assert value(samples, "imagemill_chunks_total", outcome="cancelled") == cancelled
    assert value(samples, "imagemill_chunks_total", outcome="annotated") == 4 + job.chunks_done  # not the redelivery
    assert registry.get(done_job).chunks_done == 1
