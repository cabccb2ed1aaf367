"""Metrics, logs and Celery events: a real worker's Prometheus endpoint scraped over HTTP during
and after a job, its counters checked against the job registry and the stored records; JSON
log lines carrying job and chunk ids; Celery task events that Flower and celery-exporter read."""

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from imagemill.core.accounting import Figures
from imagemill.core.broker import celery_config, make_celery
from imagemill.core.errors import ErrorKind
from imagemill.core.gpus import Slot, plan_slots
from imagemill.core.jobs import JobRegistry, JobState
from imagemill.core.logs import ContextFilter, JsonFormatter, log_context
from imagemill.core.schemas import Record, RecordError, Timings
from imagemill.core.settings import Settings
from imagemill.worker import metrics
from imagemill.worker.chunks import ChunkResult
from imagemill.worker.supervisor import celery_argv
from tests.fixtures.cli import REPO
from tests.fixtures.distributed import job_id_of, upload, upload_photos, wait_for
from tests.fixtures.images import write_mixed
from tests.fixtures.s3 import free_port
from tests.fixtures.workers import start_worker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --------------------------------------------------------------------------- helpers


def scrape(port: int, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        assert response.status == 200
        return response.read().decode()


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of `name` over every sample whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= lbls)


def labelled(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(lbls) for (n, lbls), _ in samples.items() if n == name]


def wait_for_endpoint(port: int, worker, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return scrape(port, timeout=2)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"no metrics endpoint on port {port}:\n{worker.log[-3000:]}") from None
            time.sleep(0.2)


def stored_timings(pg_url: str, job_id: str) -> list[dict]:
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("select record->'timings' from imagemill_records where job_id = %s", (job_id,)).fetchall()
    return [row[0] for row in rows]


def popen_submit(env: dict[str, str], *args: str, stderr_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "imagemill", "submit", *args],
        env={**os.environ, **env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=stderr_path.open("w"),
        text=True,
    )


def read_job_id(submit: subprocess.Popen, timeout: float = 60.0) -> str:
    """`submit` prints the job id alone on a line as soon as the job is registered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = submit.stdout.readline()
        if re.fullmatch(r"[0-9a-f]{12}", line.strip()):
            return line.strip()
        if not line and submit.poll() is not None:
            break
    raise AssertionError("submit printed no job id")


class EventListener:
    """Celery events off the broker, as Flower receives them."""

    def __init__(self, broker_url: str) -> None:
        self.app = make_celery(Settings(broker_url=broker_url))
        self.events: list[dict] = []
        self.receiver = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def types(self) -> Counter[str]:
        return Counter(event["type"] for event in list(self.events))

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(timeout=5)


# --------------------------------------------------------------------------- end to end


def test_metrics_endpoint_adds_up_to_the_job_totals_and_celery_sends_events(
    dist_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    cases = write_mixed(tmp_path / "upload")
    upload(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "mixed/", cases)
    port = free_port()
    env = {
        **dist_env,
        "IMAGEMILL_METRICS_PORT": str(port),
        "IMAGEMILL_METRICS_ADDR": "127.0.0.1",
        # slow enough (about a second per chunk) to scrape the endpoint while the job runs
        "IMAGEMILL_TEST_FAULTS": json.dumps({"sleep_per_image_s": 0.2}),
    }
    workers.append(start_worker(env, tmp_path / "worker.log").wait_ready())
    worker = workers[0]
    before = parse(wait_for_endpoint(port, worker))
    assert total(before, "imagemill_images_total") == 0
    assert labelled(before, "imagemill_queue_depth") == [{"queue": "imagemill"}]

    listener = EventListener(env["IMAGEMILL_BROKER_URL"])
    try:
        # subscribed once the worker's heartbeats arrive: from then on no event is missed
        wait_for(lambda: listener.types()["worker-heartbeat"] > 0, 30, "a worker heartbeat event")
        chunk_size = 4
        submit = popen_submit(
            env,
            f"s3://{bucket}/mixed/",
            "--tasks",
            "caption,moderation,tags",
            "--chunk-size",
            str(chunk_size),
            "--wait",
            stderr_path=tmp_path / "submit.err",
        )
        job_id = read_job_id(submit)
        registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])
        chunks_total = -(-len(cases) // chunk_size)

        # during the run: some chunks counted, never more than the registry has counted
        mid: Samples | None = None
        while submit.poll() is None and mid is None:
            samples = parse(scrape(port))
            counted = total(samples, "imagemill_chunks_total")
            job = registry.get(job_id)  # read after the scrape: metrics are recorded after the registry
            if 0 < counted < chunks_total and job.state == JobState.RUNNING:
                mid = samples
                assert counted <= job.chunks_done
                assert 0 < total(samples, "imagemill_images_total") <= job.processed
                assert value(samples, "imagemill_stage_seconds_count", stage="write") == counted
            time.sleep(0.05)
        assert submit.wait(timeout=300) == 0, (tmp_path / "submit.err").read_text() + worker.log[-3000:]
        assert mid is not None, "the job ended before the endpoint was scraped mid-run"

        job = registry.get(job_id)
        assert job.state == JobState.DONE and job.processed == len(cases)
        wait_for(lambda: listener.types()["task-succeeded"] >= chunks_total, 30, "task-succeeded events")
    finally:
        listener.stop()

    after = parse(scrape(port))
    # images by outcome and error kind: exactly the job's totals
    assert value(after, "imagemill_images_total", outcome="annotated", kind="") == job.annotated
    failed = {
        lbls["kind"]: value(after, "imagemill_images_total", **lbls)
        for lbls in labelled(after, "imagemill_images_total")
        if lbls["outcome"] == "failed"
    }
    assert {kind: n for kind, n in failed.items() if n} == job.failed_by_kind
    assert sum(failed.values()) == job.failed > 0
    # chunks and their sizes
    assert value(after, "imagemill_chunks_total", outcome="annotated") == job.chunks_done == chunks_total
    assert total(after, "imagemill_chunks_total") == chunks_total  # nothing redelivered, cancelled or dropped
    assert value(after, "imagemill_chunk_size_count") == chunks_total
    assert value(after, "imagemill_chunk_size_sum") == len(cases)
    # per-stage latency: one observation per image that went through the stage, one write per chunk
    timings = stored_timings(pg_url, job_id)
    assert len(timings) == len(cases)
    for stage in ("fetch", "decode", "infer"):
        ran = sum(1 for t in timings if t[f"{stage}_ms"] > 0)
        assert value(after, "imagemill_stage_seconds_count", stage=stage) == ran, stage
        assert ran >= job.annotated
    fetched = value(after, "imagemill_stage_seconds_count", stage="fetch")
    assert fetched >= value(after, "imagemill_stage_seconds_count", stage="decode")
    assert value(after, "imagemill_stage_seconds_count", stage="write") == chunks_total
    assert value(after, "imagemill_stage_seconds_sum", stage="write") > 0
    # model batches hold exactly the images that reached the models
    decoded = value(after, "imagemill_stage_seconds_count", stage="decode")
    assert value(after, "imagemill_batch_size_sum") == decoded
    assert value(after, "imagemill_batch_size_count") >= decoded / int(env["IMAGEMILL_BATCH_SIZE"])
    # model load time per task, queue depth (drained), and no GPU on a CPU worker
    loads = {
        task: value(after, "imagemill_model_load_seconds", task=task) for task in ("caption", "moderation", "tags")
    }
    assert all(loads.values()), loads  # every model's load was recorded
    assert value(after, "imagemill_queue_depth", queue="imagemill") == 0
    assert ("imagemill_queue_depth", frozenset({("queue", "imagemill")})) in after
    assert not labelled(after, "imagemill_gpu_memory_bytes")

    # Celery events: what Flower and celery-exporter show
    types = listener.types()
    for kind in ("task-sent", "task-received", "task-started", "task-succeeded"):
        assert types[kind] >= chunks_total, (kind, types)


def test_worker_json_logs_carry_job_and_chunk_ids(
    dist_env: dict[str, str], bucket: str, workers: list, tmp_path: Path
) -> None:
    upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "json/", 4)
    env = {**dist_env, "IMAGEMILL_LOG_FORMAT": "json"}
    workers.append(start_worker(env, tmp_path / "worker.log").wait_ready())
    from tests.fixtures.cli import run_cli

    result = run_cli("submit", f"s3://{bucket}/json/", "--tasks", "moderation", "--chunk-size", "2", "--wait", env=env)
    assert result.returncode == 0, result.stderr
    job_id = job_id_of(result.stdout)
    worker = workers[0]
    wait_for(lambda: worker.log.count("succeeded in") >= 2, 30, "both chunks' `succeeded` lines")
    lines = [line for line in worker.log.splitlines() if line.strip()]
    not_json = [line for line in lines if not _is_json_object(line)]
    assert not not_json, f"not JSON: {not_json[:5]}"  # every line is one JSON object: no banner, no text
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert {"ts", "level", "logger", "message", "job_id", "chunk_id"} <= set(entry)
    assert any(e["logger"] == "imagemill.worker.supervisor" and e["message"].startswith("started cpu") for e in entries)
    done = [e for e in entries if e["logger"] == "imagemill.worker.tasks" and ": annotated" in e["message"]]
    chunks = sorted(e["chunk_id"] for e in done)
    assert len(chunks) == 2 and all(c.startswith(f"{job_id}/") for c in chunks), done
    assert all(e["chunk_id"] in e["message"] for e in done), done
    # every line about the job names it, and its chunk
    about_job = [e for e in entries if job_id in e["message"]]
    for entry in about_job:
        assert entry["job_id"] == job_id and entry["chunk_id"] in chunks, entry
    # Celery's own line for the task, logged after our code returned, carries the ids too
    succeeded = [e for e in entries if e["logger"] == "celery.app.trace" and "succeeded" in e["message"]]
    assert sorted(e["chunk_id"] for e in succeeded) == chunks


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# --------------------------------------------------------------------------- units


def _json_line(_logger: logging.Logger, stream: io.StringIO) -> dict:
    return json.loads(stream.getvalue().splitlines()[-1])


@pytest.fixture
def json_logger() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("imagemill.test_json")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_json_lines_carry_the_ids_of_their_context(json_logger) -> None:
    logger, stream = json_logger
    with log_context(job_id="abc123def456", chunk_id="abc123def456/7"):
        logger.info("chunk %s: %s", "abc123def456/7", "annotated")
    entry = _json_line(logger, stream)
    assert entry["job_id"] == "abc123def456" and entry["chunk_id"] == "abc123def456/7"
    assert entry["message"] == "chunk abc123def456/7: annotated"
    assert entry["level"] == "INFO" and entry["logger"] == "imagemill.test_json"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
    logger.info("outside")
    entry = _json_line(logger, stream)
    assert entry["job_id"] is None and entry["chunk_id"] is None
    assert len(stream.getvalue().splitlines()) == 2  # one line per event


def test_json_lines_include_exceptions_and_extras(json_logger) -> None:
    logger, stream = json_logger
    with log_context(job_id="j1"):
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            logger.exception("it failed", extra={"uri": "s3://b/k.jpg"})
    assert len(stream.getvalue().splitlines()) == 1  # the traceback's newlines are escaped
    entry = _json_line(logger, stream)
    assert entry["level"] == "ERROR" and entry["job_id"] == "j1" and entry["chunk_id"] is None
    assert "Traceback" in entry["exc_info"] and "ValueError: bad" in entry["exc_info"]
    assert entry["uri"] == "s3://b/k.jpg"


def test_log_context_is_per_thread_and_restored() -> None:
    seen: list[str | None] = []
    with log_context(job_id="outer", chunk_id="outer/0"):
        with log_context(chunk_id="outer/1"):
            record = logging.LogRecord("x", logging.INFO, "", 0, "m", None, None)
            ContextFilter().filter(record)
            assert (record.job_id, record.chunk_id) == ("outer", "outer/1")
        thread = threading.Thread(target=lambda: seen.append(_ids_now()))
        thread.start()
        thread.join()
        assert _ids_now() == ("outer", "outer/0")
    assert seen == [(None, None)]
    assert _ids_now() == (None, None)


def _ids_now() -> tuple[str | None, str | None]:
    record = logging.LogRecord("x", logging.INFO, "", 0, "m", None, None)
    ContextFilter().filter(record)
    return record.job_id, record.chunk_id


def test_each_worker_process_gets_its_own_metrics_port() -> None:
    slots = plan_slots("all", detect=lambda: ["0", "1", "3"])
    envs = [slot.env({"IMAGEMILL_METRICS_PORT": "9100"}) for slot in slots]
    assert [e["IMAGEMILL_METRICS_PORT"] for e in envs] == ["9100", "9101", "9102"]
    assert [s.index for s in plan_slots("0,2", detect=list)] == [0, 1]
    assert "IMAGEMILL_METRICS_PORT" not in plan_slots("cpu")[0].env({})
    assert plan_slots("cpu")[0].env({"IMAGEMILL_METRICS_PORT": "9100"})["IMAGEMILL_METRICS_PORT"] == "9100"


def test_celery_events_are_on() -> None:
    config = celery_config(Settings())
    assert config["worker_send_task_events"] is True and config["task_send_sent_event"] is True
    argv = celery_argv(Slot("0"), ["imagemill"], "INFO", hostname="box")
    assert "--task-events" in argv and "--quiet" not in argv
    quiet = celery_argv(Slot("0"), ["imagemill"], "INFO", hostname="box", quiet=True)
    assert quiet[3:7] == ["-A", "imagemill.worker", "--quiet", "worker"]  # a global option, before the subcommand


def _record(error: ErrorKind | None, fetch_ms: float = 1.0, decode_ms: float = 2.0, infer_ms: float = 3.0) -> Record:
    return Record(
        uri="s3://b/k.jpg",
        etag="e",
        signature="s",
        error=RecordError(kind=error, message="x") if error else None,
        timings=Timings(fetch_ms=fetch_ms, decode_ms=decode_ms, infer_ms=infer_ms),
    )


def test_a_redelivered_chunk_is_not_counted_twice() -> None:
    from prometheus_client import REGISTRY

    def get(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    records = [
        _record(None),
        _record(ErrorKind.TRUNCATED, decode_ms=0, infer_ms=0),
        _record(ErrorKind.NOT_FOUND, 0, 0, 0),
    ]
    start = {
        "ok": get("imagemill_images_total", outcome="annotated", kind=""),
        "trunc": get("imagemill_images_total", outcome="failed", kind="truncated"),
        "chunks": get("imagemill_chunks_total", outcome="annotated"),
        "again": get("imagemill_chunks_total", outcome="redelivered"),
        "fetch": get("imagemill_stage_seconds_count", stage="fetch"),
        "decode": get("imagemill_stage_seconds_count", stage="decode"),
        "write": get("imagemill_stage_seconds_count", stage="write"),
    }
    metrics.record_chunk(ChunkResult("j/0", "annotated", {}, True), records, 0.01)
    metrics.record_chunk(ChunkResult("j/0", "annotated", {}, False), records, 0.01)
    assert get("imagemill_images_total", outcome="annotated", kind="") - start["ok"] == 1
    assert get("imagemill_images_total", outcome="failed", kind="truncated") - start["trunc"] == 1
    assert get("imagemill_chunks_total", outcome="annotated") - start["chunks"] == 1
    assert get("imagemill_chunks_total", outcome="redelivered") - start["again"] == 1
    # the work was done twice, so latencies are observed twice; a stage that did not run is not
    assert get("imagemill_stage_seconds_count", stage="fetch") - start["fetch"] == 4
    assert get("imagemill_stage_seconds_count", stage="decode") - start["decode"] == 2
    assert get("imagemill_stage_seconds_count", stage="write") - start["write"] == 2


def test_images_per_task_are_counted_by_queue_and_lane_once_per_chunk() -> None:
    from prometheus_client import REGISTRY

    def get(task: str, lane: str) -> float:
        labels = {"task": task, "queue": "imagemill", "lane": lane}
        return REGISTRY.get_sample_value("imagemill_task_images_total", labels) or 0.0

    before = {lane: get("tags", lane) for lane in ("urgent", "backfill")}

    def chunk(chunk_id: str, first_time: bool, lane: str) -> ChunkResult:
        return ChunkResult(chunk_id, "annotated", {}, first_time, queue="imagemill", tasks=("tags",), lane=lane)

    # an upload's chunk of one image, a backfill's of 64, and that one again (a redelivery)
    for result, images in ((chunk("j/0", True, "urgent"), 1), (chunk("b/0", True, "backfill"), 64),
                           (chunk("b/0", False, "backfill"), 64)):  # fmt: skip
        metrics.record_accounting(result, images, Figures())
    assert (get("tags", "urgent") - before["urgent"], get("tags", "backfill") - before["backfill"]) == (1, 64)


def test_queue_wait_and_upload_to_record_are_histograms_by_lane_in_seconds() -> None:
    from prometheus_client import REGISTRY

    def get(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    hooks = metrics.PrometheusMiddleware()
    before = {lane: get("imagemill_queue_wait_seconds_count", lane=lane) for lane in ("urgent", "backfill")}
    uploads = get("imagemill_upload_to_record_seconds_count", lane="urgent")
    under_five = get("imagemill_upload_to_record_seconds_bucket", lane="urgent", le="5.0")
    hooks.chunk_started("urgent", 0.3)
    hooks.chunk_started("backfill", 3600.0)
    hooks.uploads_recorded("urgent", [1.5, 4.0, 12.0])
    assert get("imagemill_queue_wait_seconds_count", lane="urgent") - before["urgent"] == 1
    assert get("imagemill_queue_wait_seconds_count", lane="backfill") - before["backfill"] == 1
    assert get("imagemill_upload_to_record_seconds_count", lane="urgent") - uploads == 3
    assert get("imagemill_upload_to_record_seconds_bucket", lane="urgent", le="5.0") - under_five == 2


def test_queue_depth_is_read_at_scrape_time_and_an_outage_reports_nothing(redis_url: str) -> None:
    import redis

    collector = metrics.QueueDepthCollector(redis_url, ["imagemill", "captions"])
    redis.Redis.from_url(redis_url).rpush("captions", "a", "b")  # urgent: the queue's own list
    redis.Redis.from_url(redis_url).rpush("captions\x06\x166", "c")  # backfill: kombu's list for step 6
    family, lanes = list(collector.collect())
    assert {s.labels["queue"]: s.value for s in family.samples} == {"imagemill": 0, "captions": 3}
    by_lane = {(s.labels["queue"], s.labels["lane"]): s.value for s in lanes.samples}
    assert by_lane[("captions", "urgent")] == 2 and by_lane[("captions", "backfill")] == 1
    assert by_lane[("captions", "normal")] == 0 and by_lane[("imagemill", "urgent")] == 0
    port = free_port()  # nothing listens there
    down = metrics.QueueDepthCollector(f"redis://127.0.0.1:{port}/0", ["imagemill"])
    assert list(down.collect()) == []


@pytest.mark.slow
def test_gpu_memory_is_reported_only_where_cuda_is_in_use_and_never_starts_it() -> None:
    import subprocess
    import sys

    # a fresh process, where nothing has touched CUDA yet
    code = (
        "import torch; from imagemill.worker import metrics; "
        "print(list(metrics.GpuMemoryCollector().collect()), torch.cuda.is_initialized())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] False"


def test_serve_over_http_and_a_busy_port_never_raises(caplog: pytest.LogCaptureFixture, redis_url: str) -> None:
    registry = CollectorRegistry()
    port = free_port()
    thread = metrics.serve(
        Settings(metrics_port=port, metrics_addr="127.0.0.1", broker_url=redis_url), registry=registry
    )
    thread.join(timeout=10)
    samples = parse(scrape(port))
    assert ("imagemill_queue_depth", frozenset({("queue", "imagemill")})) in samples
    assert metrics.serve(Settings(metrics_port=port), registry=registry) is None  # once per process

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        caplog.set_level(logging.WARNING, logger="imagemill.worker.metrics")
        thread = metrics.serve(
            Settings(metrics_port=taken, metrics_addr="127.0.0.1"),
            registry=CollectorRegistry(),
            attempts=3,
            pause_s=0.05,
        )
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert f"cannot listen on 127.0.0.1:{taken}" in caplog.text and "running without metrics" in caplog.text
