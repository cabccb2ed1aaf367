"""Every Prometheus metric of a worker process, in one place, and the endpoint that serves them.

`PrometheusMiddleware` records them at the pipeline's hooks; the worker's runtime installs it
(local mode does not, and never imports prometheus_client). `serve` starts the HTTP endpoint
(`IMAGEMILL_METRICS_PORT`) in the process that runs the chunks. Image and chunk outcomes are
counted when the job registry counts them (once per chunk id), so they add up to the job totals
however often a chunk is redelivered; latencies and sizes are observed for every delivery,
since the work was done again.
"""

import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import redis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imagemill.core.accounting import MODEL_PREFIX, Figures
from imagemill.core.connections import redis_client
from imagemill.core.lanes import Lane
from imagemill.core.redaction import redact_url
from imagemill.core.schemas import Record
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task
from imagemill.pipeline.hooks import ChunkReport, Middleware

log = logging.getLogger(__name__)

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 10_000)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

IMAGES = Counter(
    "imagemill_images",
    "Images finished, counted once per chunk: outcome annotated|failed, kind the error kind",
    ["outcome", "kind"],
)
CHUNKS = Counter(
    "imagemill_chunks",
    "Chunks finished by outcome: annotated, dead_lettered, cancelled, unknown_job, or redelivered "
    "(written again, not counted again)",
    ["outcome"],
)
CHUNK_SIZE = Histogram("imagemill_chunk_size", "Images per chunk written", buckets=SIZE_BUCKETS)
BATCH_SIZE = Histogram("imagemill_batch_size", "Images per model batch", buckets=SIZE_BUCKETS)
STAGE_SECONDS = Histogram(
    "imagemill_stage_seconds",
    "Latency per stage: fetch, decode and infer per image (infer is the image's share of its batch), write per chunk",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
# queue waits run from seconds (an idle urgent lane) to hours (a backfill behind millions)
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 7200, 14_400, 43_200, 86_400)
QUEUE_WAIT_SECONDS = Histogram(
    "imagemill_queue_wait_seconds",
    "Seconds from a chunk's enqueueing to a worker starting it, by lane (urgent|normal|backfill)",
    ["lane"],
    buckets=WAIT_BUCKETS,
)
UPLOAD_TO_RECORD_SECONDS = Histogram(
    "imagemill_upload_to_record_seconds",
    "Seconds from an object's upload event to its record written, by lane",
    ["lane"],
    buckets=WAIT_BUCKETS,
)
MODEL_LOAD_SECONDS = Gauge("imagemill_model_load_seconds", "Seconds the last load of a task's model took", ["task"])
# the accounting (imagemill.core.accounting), counted for every delivery (the work was done again);
# `imagemill_stage_seconds` is the latency histogram above, so the summed seconds carry `image_` in front
IMAGE_STAGE_SECONDS = Counter(
    "imagemill_image_stage_seconds",
    "Seconds spent per stage, summed over images: read, decode, preprocess (prefetch threads), model (per task), "
    "records, write",
    ["stage", "task"],
)
RUN_SECONDS = Counter("imagemill_run_seconds", "Wall seconds this process spent running chunks")
RUN_CPU_SECONDS = Counter("imagemill_run_cpu_seconds", "CPU seconds of this process while running chunks")
ACCELERATOR_BUSY_SECONDS = Counter(
    "imagemill_accelerator_busy_seconds", "Wall seconds the models computed (every task of every batch)"
)
MODEL_CPU_SECONDS = Counter("imagemill_model_cpu_seconds", "CPU seconds of this process while the models ran")
ACCELERATOR_BUSY_RATIO = Gauge(
    "imagemill_accelerator_busy_ratio",
    "The accelerator's busy share since start: on a GPU its compute time over the wall time, on the CPU the "
    "models' share of the process's CPU time",
)
DECODE_STARVATION_SECONDS = Counter(
    "imagemill_decode_starvation_seconds", "Seconds the models waited for input (fetch, decode, preprocess)"
)
COST = Counter("imagemill_cost", "What this process's chunks cost, in the currency of IMAGEMILL_COST_PER_HOUR")
TASK_IMAGES = Counter(
    "imagemill_task_images",
    "Images finished per task, queue and lane (urgent|normal|backfill), counted once per chunk",
    ["task", "queue", "lane"],
)


class PrometheusMiddleware(Middleware):
    """The metrics above, recorded at the pipeline's hooks."""

    def __init__(self) -> None:
        self.figures = Figures()  # every chunk's, for the busy ratio since start

    def after_model_load(self, task: Task, seconds: float) -> None:
        record_model_load(task.value, seconds)

    def after_batch(self, size: int) -> None:
        record_batch(size)

    def after_chunk(self, result: ChunkReport, records: Sequence[Record]) -> None:
        record_chunk(result, records, result.write_seconds)
        self.figures += result.figures
        record_accounting(result, len(records), self.figures)

    def chunk_dropped(self, outcome: str) -> None:
        record_chunk_dropped(outcome)

    def chunk_started(self, lane: str, queue_wait_s: float) -> None:
        QUEUE_WAIT_SECONDS.labels(lane).observe(queue_wait_s)

    def uploads_recorded(self, lane: str, seconds: Sequence[float]) -> None:
        histogram = UPLOAD_TO_RECORD_SECONDS.labels(lane)
        for value in seconds:
            histogram.observe(value)


def record_chunk(result: ChunkReport, records: Sequence[Record], write_seconds: float) -> None:
    """A chunk was written (`result` is imagemill.worker.chunks.ChunkResult); count it as the registry did."""
    CHUNK_SIZE.observe(len(records))
    STAGE_SECONDS.labels("write").observe(write_seconds)
    for record in records:
        timings = record.timings
        # a stage that did not run (the fetch failed, the image never decoded) left its time at 0
        if timings.fetch_ms > 0:
            STAGE_SECONDS.labels("fetch").observe(timings.fetch_ms / 1000)
        if timings.decode_ms > 0:
            STAGE_SECONDS.labels("decode").observe(timings.decode_ms / 1000)
        if timings.infer_ms > 0:
            STAGE_SECONDS.labels("infer").observe(timings.infer_ms / 1000)
    if not result.first_time:
        CHUNKS.labels("redelivered").inc()
        return
    CHUNKS.labels(result.outcome).inc()
    for record in records:
        if record.error is None:
            IMAGES.labels("annotated", "").inc()
        else:
            IMAGES.labels("failed", record.error.kind.value).inc()


def record_accounting(result: ChunkReport, images: int, since_start: Figures) -> None:
    """A delivery's accounting and cost; its images per task once the registry counted the chunk."""
    figures = result.figures
    for name, seconds in figures.stages.items():
        stage, task = ("model", name.removeprefix(MODEL_PREFIX)) if name.startswith(MODEL_PREFIX) else (name, "")
        IMAGE_STAGE_SECONDS.labels(stage, task).inc(max(seconds, 0.0))
    RUN_SECONDS.inc(max(figures.wall_s, 0.0))
    RUN_CPU_SECONDS.inc(max(figures.cpu_s, 0.0))
    ACCELERATOR_BUSY_SECONDS.inc(max(figures.model_s, 0.0))
    MODEL_CPU_SECONDS.inc(max(figures.model_cpu_s, 0.0))
    DECODE_STARVATION_SECONDS.inc(max(figures.starved_s, 0.0))
    if result.cost is not None:
        COST.inc(result.cost)
    if since_start.busy_ratio is not None:
        ACCELERATOR_BUSY_RATIO.set(since_start.busy_ratio)
    if result.first_time:
        for task in result.tasks:
            TASK_IMAGES.labels(task, result.queue, result.lane).inc(images)


def record_chunk_dropped(outcome: str) -> None:
    """A chunk that was not run: `cancelled` (its job was cancelled or failed) or `unknown_job`."""
    CHUNKS.labels(outcome).inc()


def record_batch(size: int) -> None:
    BATCH_SIZE.observe(size)


def record_model_load(task: str, seconds: float) -> None:
    MODEL_LOAD_SECONDS.labels(task).set(seconds)


class QueueDepthCollector(Collector):
    """`imagemill_queue_depth{queue}`: chunks waiting in each queue (every lane), and
    `imagemill_lane_depth{queue,lane}` the same by lane, read from Redis at scrape time.

    Reports nothing (never raises) when Redis cannot be reached."""

    def __init__(self, broker_url: str, queues: Iterable[str]) -> None:
        self._url = broker_url
        self._queues = sorted(set(queues))
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()

    def _redis(self) -> redis.Redis:
        with self._lock:
            if self._client is None:
                # a probe (short timeouts, no retries): a scrape must not hang on a Redis outage
                self._client = redis_client(self._url, probe=True)
            return self._client

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("imagemill_queue_depth", "Chunks waiting in the queue", labels=["queue"]),
            GaugeMetricFamily(
                "imagemill_lane_depth", "Chunks waiting in one lane of the queue", labels=["queue", "lane"]
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        total, by_lane = self._families()
        from imagemill.core.broker import lane_depth, queue_depth  # here, so that local mode never imports Celery

        try:
            client = self._redis()
            for queue in self._queues:
                total.add_metric([queue], queue_depth(client, queue))
                for lane in Lane:
                    by_lane.add_metric([queue, lane.value], lane_depth(client, queue, lane))
        except Exception as exc:  # noqa: BLE001 - a scrape reports what it can
            log.debug("queue depth unavailable from %s: %s", redact_url(self._url), type(exc).__name__)
            return
        yield total
        yield by_lane


class GpuMemoryCollector(Collector):
    """`imagemill_gpu_memory_bytes{kind=allocated|reserved}` of this process's GPU.

    Reported only once this process has initialised CUDA itself; never imports torch or
    initialises CUDA (that must happen in the pinned process, on its own schedule)."""

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily("imagemill_gpu_memory_bytes", "GPU memory held by torch", labels=["kind"])]

    def collect(self) -> Iterator[Metric]:
        torch = sys.modules.get("torch")
        if torch is None:
            return
        try:
            # is_initialized first: it touches nothing, so is_available never probes the driver early
            if not (torch.cuda.is_initialized() and torch.cuda.is_available()):
                return
            family = GaugeMetricFamily("imagemill_gpu_memory_bytes", "GPU memory held by torch", labels=["kind"])
            family.add_metric(["allocated"], torch.cuda.memory_allocated())
            family.add_metric(["reserved"], torch.cuda.memory_reserved())
        except Exception as exc:  # noqa: BLE001
            log.debug("GPU memory unavailable: %s", exc)
            return
        yield family


_served: set[int] = set()  # registries already served by this process


def serve(
    settings: Settings,
    registry: CollectorRegistry = REGISTRY,
    attempts: int = 10,
    pause_s: float = 1.0,
) -> threading.Thread | None:
    """Serve /metrics on `settings.metrics_port` from a background thread; once per process.

    Binding is retried (a replaced worker's port may still be held for a moment); if it never
    succeeds a warning is logged and the worker runs on without metrics. Returns the thread."""
    if settings.metrics_port is None or id(registry) in _served:
        return None
    _served.add(id(registry))
    registry.register(QueueDepthCollector(settings.broker_url, {settings.queue, *settings.routes.values()}))
    registry.register(GpuMemoryCollector())
    port, addr = settings.metrics_port, settings.metrics_addr

    def bind() -> None:
        for attempt in range(1, attempts + 1):
            try:
                start_http_server(port, addr=addr, registry=registry)
            except OSError as exc:
                if attempt == attempts:
                    log.warning("metrics: cannot listen on %s:%d (%s); running without metrics", addr, port, exc)
                    return
                log.warning("metrics: %s:%d is busy (%s); retrying in %.0fs", addr, port, exc, pause_s)
                time.sleep(pause_s)
            else:
                log.info("metrics: serving Prometheus metrics on http://%s:%d/metrics", addr, port)
                return

    thread = threading.Thread(target=bind, name="imagemill-metrics-bind", daemon=True)
    thread.start()
    return thread
