"""Upload-to-record latency while a backfill runs, and what the uploads cost the backfill.

    python -m bench.latency.uploads --backfill 20000 --uploads 50 --spread 60 --out bench/results

One `imagemill worker --gpus cpu` with the tiny models, a private redis-server, a fresh PostgreSQL
database and moto's server (S3 and SQS; it delivers the bucket's notifications to its queue) are
started here. A backfill of `--backfill` images (a folder: hard links to a few photos) is submitted
in the backfill lane; `imagemill watch sqs://QUEUE --priority urgent` follows the bucket. Then
three windows: the backfill alone (`--window` s), the backfill while `--uploads` photos are put
into the bucket evenly over `--spread` s, the backfill alone again. Measured:

- per upload, the seconds from `put_object` returning to its record being written (the record
  row's `written_at`, the database's clock on this same machine): p50, p95, max;
- the backfill's throughput (its job's processed images over each window, from the registry): with
  uploads against the mean of the two windows alone.

Targets (issue 25): p95 under 5 s while the backfill runs; the backfill's throughput with uploads
within 10% of alone. `--no-lanes` submits without lanes (one first-come-first-served queue), for
comparison.
"""

import argparse
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import boto3
import psycopg
from moto.server import ThreadedMotoServer

from bench import DEFAULT_CACHE, REPO
from bench.machine import TICK, busy_cpu_s, describe, loadavg
from bench.memory import descendants, stat_fields
from bench.models import tiny_set
from bench.report import save_results
from imagemill.core.jobs import JobRegistry
from tests.fixtures.images import photo_jpeg
from tests.fixtures.postgres import admin_url, fresh_database
from tests.fixtures.redis import RedisServer
from tests.fixtures.s3 import free_port
from tests.fixtures.watchers import notify_queue, start_watcher
from tests.fixtures.workers import start_worker

TASKS = "caption,moderation,tags"
P95_TARGET_S = 5.0
THROUGHPUT_TARGET = 0.90  # with uploads, at least this share of the backfill's rate alone


def backfill_folder(folder: Path, count: int, distinct: int = 16) -> Path:
    """`count` JPEGs (hard links to `distinct` photos of 320x240) in `folder`."""
    folder.mkdir(parents=True)
    originals = []
    for seed in range(distinct):
        path = folder / f"original_{seed:02d}.jpg"
        path.write_bytes(photo_jpeg(320, 240, seed=seed))
        originals.append(path)
    for index in range(count - distinct):
        os.link(originals[index % distinct], folder / f"img_{index:06d}.jpg")
    return folder


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    models = tiny_set(args.cache)
    images = backfill_folder(scratch / "backfill", args.backfill)
    uploads = [photo_jpeg(320, 240, seed=1000 + i) for i in range(args.uploads)]
    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    redis_server = RedisServer(scratch / "redis", appendonly=False).start()
    bucket, queue = f"uploads-{uuid.uuid4().hex[:8]}", f"uploads-{uuid.uuid4().hex[:8]}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    notify_queue(endpoint, bucket, queue)
    try:
        with fresh_database(admin_url()) as pg_url:
            env = {
                **models.env(),
                "IMAGEMILL_CAPTION_MAX_NEW_TOKENS": "6",
                "IMAGEMILL_BATCH_SIZE": "16",
                "IMAGEMILL_DEVICE": "cpu",
                "IMAGEMILL_BROKER_URL": redis_server.url,
                "IMAGEMILL_SINK": pg_url,
                "IMAGEMILL_S3_ENDPOINT_URL": endpoint,
                "IMAGEMILL_ALLOWED_SOURCES": f"{images.resolve().as_uri()}/,s3://{bucket}/",
                "IMAGEMILL_CHUNK_SIZE": str(args.chunk_size),
                "IMAGEMILL_QUEUE_HIGH_WATER": "1000",
                "AWS_ENDPOINT_URL_SQS": endpoint,
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
            worker = start_worker(env, scratch / "worker.log")
            watch_env = {**env, "IMAGEMILL_WATCH_BATCH_S": str(args.watch_batch_s)}
            lane = ["--priority", "urgent"] if args.lanes else ["--priority", "normal"]
            watcher = start_watcher(watch_env, scratch / "watch.log", f"sqs://{queue}", "--tasks", TASKS, *lane)
            try:
                worker.wait_ready(timeout=300)
                watcher.wait_ready(timeout=120)
                pids = {"worker": worker.process.pid, "watcher": watcher.process.pid, "bench and moto": os.getpid()}
                measured = measure(args, env, images, s3, bucket, uploads, pg_url, redis_server.url, pids)
                measured["chunks"] = chunk_times(worker.log)
                return measured
            finally:
                watcher.stop()
                worker.stop()
    finally:
        redis_server.stop()
        moto.stop()


def measure(
    args: argparse.Namespace,
    env: dict[str, str],
    images: Path,
    s3: Any,
    bucket: str,
    uploads: list[bytes],
    pg_url: str,
    redis_url: str,
    pids: dict[str, int],
) -> dict[str, Any]:
    registry = JobRegistry(redis_url)
    submit = [sys.executable, "-m", "imagemill", "submit", str(images), "--tasks", TASKS, "--sink", pg_url]
    if args.lanes:
        submit += ["--priority", "backfill"]
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    result = subprocess.run(submit, env=full_env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"submit exited with {result.returncode}: {result.stderr[-2000:]}")
    job_id = _job_id(result.stdout)

    def processed() -> int:
        job = registry.get(job_id)
        return job.processed if job else 0

    # warm: the first backfill chunks are done (models loaded, caches warm)
    deadline = time.monotonic() + 300
    while processed() < 2 * args.chunk_size:
        if time.monotonic() > deadline:
            raise RuntimeError("the backfill did not start within 300 s")
        time.sleep(0.5)

    windows: list[dict[str, Any]] = []

    def window(name: str, seconds: float, during: Any = None) -> None:
        before, started, cpu_before = processed(), time.monotonic(), cpu(pids)
        extra = during() if during else None
        left = seconds - (time.monotonic() - started)
        if left > 0:
            time.sleep(left)
        after, ended, cpu_after = processed(), time.monotonic(), cpu(pids)
        wall = ended - started
        windows.append(
            {
                "window": name,
                "seconds": round(wall, 2),
                "images": after - before,
                "images_per_s": round((after - before) / wall, 2),
                # cores each used over the window; `others`: the rest of the machine
                "cores": {key: round((cpu_after[key] - cpu_before[key]) / wall, 2) for key in cpu_after},
            }
        )
        if extra is not None:
            windows[-1]["uploads"] = len(extra)

    put_times: dict[str, float] = {}

    def upload_evenly() -> dict[str, float]:
        gap = args.spread / len(uploads)
        start = time.monotonic()
        for index, data in enumerate(uploads):
            delay = start + index * gap - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            key = f"new/upload_{index:03d}.jpg"
            s3.put_object(Bucket=bucket, Key=key, Body=data)
            put_times[f"s3://{bucket}/{key}"] = time.time()
        return put_times

    window("alone (before)", args.window)
    window("with uploads", args.spread, upload_evenly)
    window("alone (after)", args.window)
    job = registry.get(job_id)
    backfill_running = job is not None and job.state.value == "running"
    # without lanes the last uploads wait for the whole backfill: give them that long
    written = wait_for_records(pg_url, list(put_times), timeout=args.record_timeout)

    latencies = sorted(written[uri] - put_times[uri] for uri in put_times if uri in written)
    alone = [w["images_per_s"] for w in windows if w["window"].startswith("alone")]
    with_uploads = next(w["images_per_s"] for w in windows if w["window"] == "with uploads")
    alone_mean = statistics.fmean(alone)
    # per core the worker got: on a machine others share, the worker's CPU varies between windows
    per_core = {w["window"]: w["images"] / max(w["cores"]["worker"] * w["seconds"], 1e-9) for w in windows}
    alone_per_core = statistics.fmean(v for k, v in per_core.items() if k.startswith("alone"))
    return {
        "job_id": job_id,
        "backfill_still_running": backfill_running,
        "backfill_processed_at_end": job.processed if job else None,
        "windows": windows,
        "uploads_written": len(latencies),
        "latency_s": {
            "p50": round(percentile(latencies, 50), 2) if latencies else None,
            "p95": round(percentile(latencies, 95), 2) if latencies else None,
            "max": round(latencies[-1], 2) if latencies else None,
            "all": [round(x, 2) for x in latencies],
        },
        "throughput": {
            "alone_images_per_s": round(alone_mean, 2),
            "with_uploads_images_per_s": with_uploads,
            "ratio": round(with_uploads / alone_mean, 3) if alone_mean else None,
            "images_per_worker_cpu_s": {k: round(v, 1) for k, v in per_core.items()},
            "ratio_per_worker_cpu_s": round(per_core["with uploads"] / alone_per_core, 3),
        },
    }


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and its live descendants."""
    total = 0.0
    for each in descendants(pid):
        fields = stat_fields(each)
        if fields is not None:
            total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    return total


def cpu(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process tree, and of the rest of the machine (`others`)."""
    own = {name: tree_cpu_s(pid) for name, pid in pids.items()}
    # this process's tree holds the worker and the watcher: count them once
    own["bench and moto"] -= own["worker"] + own["watcher"]
    return {**own, "others": busy_cpu_s() - sum(own.values())}


TASK_DONE = re.compile(r"succeeded in ([0-9.]+)s: .*'counts': \{([^}]*)\}")


def chunk_times(log: str) -> dict[str, Any]:
    """From the worker's log: how many chunks of one image (uploads) and of more it ran, and their
    mean seconds (Celery's task time: fetch, models, write, counting)."""
    by_size: dict[str, list[float]] = {"one image": [], "more": []}
    for match in TASK_DONE.finditer(log):
        images = sum(int(n) for n in re.findall(r": (\d+)", match.group(2)))
        by_size["one image" if images == 1 else "more"].append(float(match.group(1)))
    return {
        size: {"chunks": len(times), "mean_s": round(statistics.fmean(times), 3) if times else None}
        for size, times in by_size.items()
    }


def _job_id(stdout: str) -> str:
    for line in stdout.splitlines():
        if len(line.strip()) == 12 and all(c in "0123456789abcdef" for c in line.strip()):
            return line.strip()
    raise RuntimeError(f"submit printed no job id: {stdout[-500:]}")


def wait_for_records(pg_url: str, uris: list[str], timeout: float) -> dict[str, float]:
    """uri -> when its first record was written (epoch seconds), once all have one or at `timeout`."""
    deadline = time.monotonic() + timeout
    found: dict[str, float] = {}
    while True:
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute(
                "SELECT uri, extract(epoch FROM min(written_at)) FROM imagemill_records"
                " WHERE uri = ANY(%s) GROUP BY uri",
                (uris,),
            ).fetchall()
        found = {uri: float(at) for uri, at in rows}
        if len(found) == len(uris) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile by linear interpolation between the closest ranks (numpy's default)."""
    if len(values) == 1:
        return values[0]
    rank = (len(values) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def report(r: dict[str, Any]) -> str:
    m = r["measured"]
    lat, thr = m["latency_s"], m["throughput"]
    p95_ok = lat["p95"] is not None and lat["p95"] < P95_TARGET_S and m["uploads_written"] == r["uploads"]
    thr_ok = thr["ratio"] is not None and thr["ratio"] >= THROUGHPUT_TARGET
    mark = {True: "✓ pass", False: "✗ FAIL"}
    lines = [
        "# imagemill benchmark — upload-to-record latency during a backfill",
        "",
        f"`{r['command']}`",
        "",
        f"Machine: {r['machine'].get('cpus')} CPUs, {r['machine'].get('cpu_model', '?')}; load average at start"
        f" {r['loadavg_start']}, at end {r['loadavg_end']}. One CPU worker, tiny models ({TASKS}), chunk size"
        f" {r['chunk_size']}, lanes {'on (backfill lane; uploads urgent)' if r['lanes'] else 'off (one FIFO queue)'},"
        f" the watcher gathering events for up to {r['watch_batch_s']:g} s.",
        "",
        "| measure | value | target | |",
        "| --- | --- | --- | --- |",
        f"| uploads with a record | {m['uploads_written']} / {r['uploads']} | all | |",
        f"| upload-to-record p50 | {lat['p50']} s | | |",
        f"| upload-to-record p95 | {lat['p95']} s | < {P95_TARGET_S:g} s | {mark[p95_ok]} |",
        f"| upload-to-record max | {lat['max']} s | | |",
        f"| backfill alone | {thr['alone_images_per_s']} images/s | | |",
        f"| backfill with uploads | {thr['with_uploads_images_per_s']} images/s | | |",
        f"| with / alone | {thr['ratio']} | ≥ {THROUGHPUT_TARGET} | {mark[thr_ok]} |",
        f"| with / alone, per CPU second the worker got | {thr['ratio_per_worker_cpu_s']} | | |",
        "",
        "| window | seconds | backfill images | images/s |",
        "| --- | --- | --- | --- |",
        *(f"| {w['window']} | {w['seconds']} | {w['images']} | {w['images_per_s']} |" for w in m["windows"]),
        "",
        "CPU over each window, in cores (2 on this machine): "
        + "; ".join(f"{w['window']}: " + ", ".join(f"{k} {v}" for k, v in w["cores"].items()) for w in m["windows"]),
        "",
        f"Worker task time per chunk (Celery's): upload chunks of one image {m['chunks']['one image']},"
        f" backfill chunks {m['chunks']['more']}.",
        "",
        f"The backfill was {'still running' if m['backfill_still_running'] else 'FINISHED'} at the end"
        f" ({m['backfill_processed_at_end']} of {r['backfill']} processed)"
        + (
            "."
            if m["backfill_still_running"]
            else ": the last window is not a backfill window; use a larger --backfill."
        ),
        "",
        f"Latencies (s, sorted): {', '.join(map(str, lat['all']))}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.latency.uploads", description=__doc__.split("\n")[0])
    parser.add_argument("--backfill", type=int, default=20000, help="images in the backfill (to outlast the windows)")
    parser.add_argument("--uploads", type=int, default=50, help="uploads into the watched bucket")
    parser.add_argument("--spread", type=float, default=60.0, help="seconds the uploads are spread over")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of each backfill-alone window")
    parser.add_argument("--record-timeout", type=float, default=600, help="seconds to wait for the uploads' records")
    parser.add_argument("--chunk-size", type=int, default=64, help="images per backfill chunk")
    parser.add_argument(
        "--watch-batch-s", type=float, default=1.0, help="the watcher's IMAGEMILL_WATCH_BATCH_S (gathering window)"
    )
    parser.add_argument("--no-lanes", dest="lanes", action="store_false", help="one FIFO queue, for comparison")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    result: dict[str, Any] = {
        "command": "python -m bench.latency.uploads " + " ".join(sys.argv[1:]),
        "backfill": args.backfill,
        "uploads": args.uploads,
        "spread_s": args.spread,
        "window_s": args.window,
        "chunk_size": args.chunk_size,
        "lanes": args.lanes,
        "watch_batch_s": args.watch_batch_s,
        "machine": describe(),
        "loadavg_start": loadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="imagemill-bench-uploads-") as scratch:
        result["measured"] = run(args, Path(scratch))
    result["loadavg_end"] = loadavg()
    text = report(result)
    name = "uploads" if args.lanes else "uploads-no-lanes"
    print(save_results(args.out, name, result, text))
    print(text)


if __name__ == "__main__":
    main()
