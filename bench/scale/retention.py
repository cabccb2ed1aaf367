"""Redis memory after many finished jobs: with IMAGEMILL_JOB_RETENTION they expire, and memory goes back.

    python -m bench.scale.retention --jobs 1000 --retention 1 --out bench/results

A private redis-server (the test fixtures'); `used_memory` (INFO memory) at a baseline, after
`--jobs` small jobs ran to `done` through the registry exactly as producers and workers drive it
(create, add_queued, begin/end attempt, chunk_done per chunk, end_listing), and after the retention
has passed and `imagemill jobs` (JobRegistry.recent) has looked. The same jobs with a retention of a
week are the contrast: what every job cost Redis before jobs expired.
"""

import argparse
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from bench.report import save_results
from imagemill.core.jobs import JobRegistry
from imagemill.core.tasks import Task
from tests.fixtures.redis import RedisServer

WEEK = 7 * 24 * 3600


def used_memory(registry: JobRegistry) -> int:
    return int(registry.redis.info("memory")["used_memory"])


def run_jobs(registry: JobRegistry, count: int, chunks: int, tag: str) -> None:
    for i in range(count):
        job_id = f"{tag}{i:06d}"
        registry.create(job_id, f"s3://photos/{job_id}/", (Task.CAPTION,), "postgresql://db/x", "imagemill")
        for c in range(chunks):
            chunk_id = f"{job_id}/{c:06d}"
            registry.add_queued(job_id, listed=4, queued=4, last_uri=f"s3://photos/{job_id}/{c}.jpg")
            registry.begin_attempt(job_id, chunk_id)
            registry.chunk_started(job_id, "signature")
            registry.chunk_done(job_id, chunk_id, {"annotated": 3, "undecodable": 1})
            registry.end_attempt(job_id, chunk_id)
        registry.end_listing(job_id, chunks)


def measure(directory: Path, jobs: int, chunks: int, retention: int) -> dict[str, Any]:
    server = RedisServer(directory, appendonly=False).start()
    try:
        registry = JobRegistry(server.url, retention_s=retention)
        # a warm-up job that expires: the registry's Lua scripts are cached and counted in the baseline
        warm = JobRegistry(server.url, retention_s=1)
        run_jobs(warm, 1, chunks, "warm")
        time.sleep(2.5)
        warm.recent()
        baseline, keys_before = used_memory(registry), registry.redis.dbsize()
        started = time.monotonic()
        run_jobs(registry, jobs, chunks, "job")
        elapsed = time.monotonic() - started
        peak, keys_peak = used_memory(registry), registry.redis.dbsize()
        # Redis expires keys in its background cycle; wait past the retention (capped for a long one)
        deadline = time.monotonic() + min(retention, 5) + 10
        while time.monotonic() < deadline and registry.redis.dbsize() > keys_before:
            time.sleep(0.2)
        registry.recent()  # `imagemill jobs`: drops the index entries of expired jobs
        # Redis shrinks its emptied key tables in its cron (a few per second): let memory settle
        after, settle = used_memory(registry), time.monotonic() + 10
        while time.monotonic() < settle and after > baseline:
            time.sleep(0.5)
            after = used_memory(registry)
        keys_after = registry.redis.dbsize()
        states = {job.state.value for job in registry.recent(jobs)}
        return {
            "jobs": jobs,
            "chunks_per_job": chunks,
            "retention_s": retention,
            "seconds_to_run_jobs": round(elapsed, 2),
            "used_memory_baseline": baseline,
            "used_memory_after_jobs": peak,
            "used_memory_after_retention": after,
            "growth_bytes": after - baseline,
            "bytes_per_job_kept": round((peak - baseline) / jobs),
            "keys_baseline": keys_before,
            "keys_after_jobs": keys_peak,
            "keys_after_retention": keys_after,
            "states_left": sorted(states),
        }
    finally:
        server.stop()


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "# Redis memory after finished jobs (bench/retention.py)",
        "",
        "| retention | jobs | used_memory baseline | after the jobs | after the retention | growth "
        "| keys (baseline / jobs / after) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['retention_s']} s | {r['jobs']:,} × {r['chunks_per_job']} chunks | {r['used_memory_baseline']:,} B "
            f"| {r['used_memory_after_jobs']:,} B | {r['used_memory_after_retention']:,} B | {r['growth_bytes']:+,} B "
            f"| {r['keys_baseline']} / {r['keys_after_jobs']} / {r['keys_after_retention']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=2, help="chunks per job")
    parser.add_argument("--retention", type=int, default=1, help="IMAGEMILL_JOB_RETENTION of the measured run, s")
    parser.add_argument("--out", type=Path, default=None, help="write <timestamp>-retention.json and .md here")
    args = parser.parse_args()
    with TemporaryDirectory(prefix="imagemill-retention-") as scratch:
        results = [
            measure(Path(scratch) / "short", args.jobs, args.chunks, args.retention),
            measure(Path(scratch) / "week", args.jobs, args.chunks, WEEK),
        ]
    text = markdown(results)
    print(text)
    if args.out:
        save_results(args.out, "retention", results, text)


if __name__ == "__main__":
    main()
