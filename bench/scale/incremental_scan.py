"""The producer's memory over an incremental scan: one changed object before many unchanged ones.

    python -m bench.scale.incremental_scan --unchanged 400000 1000000 --out bench/results

Each run is `imagemill submit MANIFEST --tasks moderation --sink postgresql://…` in a child process,
end to end through the real submit path, against a private redis-server and a fresh PostgreSQL
database whose records table already holds every unchanged object (filled by the server, not
timed) under the signature published for the pipeline, as a worker would have. The manifest is
JSONL: first one changed object (no record), then `--unchanged` objects with records, so the
producer enqueues one chunk and skips the rest. A 2-line manifest (1 changed + 1 unchanged) is
the baseline. No worker runs: the chunk stays queued.

Measured per run: the child's peak RSS (its VmHWM at exit, written by `bench.scale.peak`: exact), its
RSS sampled on a thread, and the job's `skipped` count and resume point as `status` sees them during the scan
(how often they moved, and when first). Goal: the 1,000,000 run's peak within 64 MiB of the
baseline's, and progress that moves during the scan.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench import REPO
from bench.machine import describe, loadavg
from bench.memory import MIB, Sampler
from bench.report import save_results
from imagemill.core.jobs import JobRegistry
from imagemill.core.pipeline_key import pipeline_key
from imagemill.core.settings import Settings
from imagemill.core.sinks.postgres import PostgresSink
from imagemill.core.tasks import Task
from tests.fixtures.postgres import admin_url, fresh_database
from tests.fixtures.redis import RedisServer

PREFIX = "s3://bench-incremental/photos/"
CHANGED = f"{PREFIX}changed.jpg"
SIGNATURE = "bench-signature"
TASKS = (Task.MODERATION,)
GOAL_MIB = 64
GOAL_OBJECTS = 1_000_000


def unchanged_uri(n: int) -> str:
    return f"{PREFIX}{n:08d}.jpg"


def fill(url: str, objects: int) -> None:
    """Records of the unchanged objects, as earlier scans left them; filled by the server."""
    record = '{"moderation": {"flagged": false, "scores": {}}}'
    with PostgresSink(url) as store, psycopg.connect(url, autocommit=True) as conn:
        store.check()  # creates the table, its indexes and the view
        conn.execute(
            "INSERT INTO imagemill_records (uri, etag, signature, job_id, flagged, processed_at, record)"
            " SELECT %s || lpad(n::text, 8, '0') || '.jpg', 'e1', %s, 'earlier', false,"
            " now() - interval '1 day', %s::jsonb FROM generate_series(0, %s) AS n",
            (PREFIX, SIGNATURE, record, objects - 1),
        )
        conn.execute("VACUUM ANALYZE imagemill_records")


def write_manifest(path: Path, unchanged: int) -> Path:
    """One changed object first, then `unchanged` objects whose records are in the sink."""
    with path.open("w") as handle:
        handle.write(json.dumps({"uri": CHANGED, "etag": "e2"}) + "\n")
        for start in range(0, unchanged, 10_000):
            lines = (
                f'{{"uri": "{unchanged_uri(n)}", "etag": "e1"}}\n' for n in range(start, min(unchanged, start + 10_000))
            )
            handle.write("".join(lines))
    return path


def clean_environment() -> dict[str, str]:
    """This process's environment without IMAGEMILL_* settings: the child and the pipeline key here agree."""
    return {k: v for k, v in os.environ.items() if not k.startswith("IMAGEMILL_")}


def submit(manifest: Path, broker: str, sink: str, interval: float) -> dict[str, Any]:
    """`imagemill submit MANIFEST` in a child; its peak RSS, wall time, and the job as it moved."""
    client = redis.Redis.from_url(broker)
    client.flushall()  # one job at a time: `recent(1)` is this run's
    registry = JobRegistry(broker)
    settings = Settings(broker_url=broker)
    registry.publish_signature(pipeline_key(TASKS, settings), SIGNATURE)  # what a worker publishes
    env = {**clean_environment(), "IMAGEMILL_BROKER_URL": broker, "PYTHONPATH": str(REPO)}
    peak_file = manifest.with_suffix(".peak")
    submit_args = ["imagemill", "submit", str(manifest), "--tasks", "moderation", "--sink", sink]
    args = [sys.executable, "-m", "bench.scale.peak", str(peak_file), *submit_args]
    seen: list[tuple[float, int, str | None]] = []  # (t, skipped, resume point) each time they moved
    started = time.perf_counter()

    def probe() -> dict[str, Any]:
        jobs = registry.recent(1)
        if not jobs:
            return {}
        job = jobs[0]
        if not seen or seen[-1][1:] != (job.skipped, job.resume_after):
            seen.append((round(time.perf_counter() - started, 2), job.skipped, job.resume_after))
        return {"skipped": job.skipped, "listed": job.listed}

    with tempfile.TemporaryFile("w+") as output:
        child = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
        with Sampler(child.pid, interval, probe=probe) as sampler:
            child.wait()
        wall = time.perf_counter() - started
        if child.returncode != 0:
            output.seek(0)
            raise RuntimeError(f"submit exited with {child.returncode}:\n{output.read()[-3000:]}")
    (job,) = registry.recent(1)
    registry.close()
    client.close()
    moved = [(t, skipped) for t, skipped, _ in seen if skipped]
    return {
        "peak_mib": round(int(peak_file.read_text()) / MIB, 1),
        "wall_s": round(wall, 1),
        "listed": job.listed,
        "queued": job.queued,
        "skipped": job.skipped,
        "chunks": job.chunks_queued,
        "resume_after": job.resume_after,
        # how often `status` saw the skipped count (or the resume point) move while the producer ran
        "progress_moves_seen": len(moved),
        "first_progress_s": moved[0][0] if moved else None,
        "progress": [{"t_s": t, "skipped": s} for t, s, _ in seen][:: max(1, len(seen) // 24)],
        "samples": len(sampler.samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale.incremental_scan", description=__doc__.split("\n")[0])
    parser.add_argument("--unchanged", type=int, nargs="+", default=[GOAL_OBJECTS], help="unchanged objects per run")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between RSS and progress samples")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    os.environ.clear()
    os.environ.update(clean_environment())
    counts: list[int] = sorted(args.unchanged)
    result: dict[str, Any] = {"unchanged": counts, "machine": describe(), "loadavg_start": loadavg(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="imagemill-bench-") as scratch:
        folder = Path(scratch)
        server = RedisServer(folder / "redis", appendonly=False).start()
        try:
            with fresh_database(admin_url()) as pg_url:
                start = time.perf_counter()
                fill(pg_url, max(counts))
                result["fill_s"] = round(time.perf_counter() - start, 1)
                for unchanged in [1, *counts]:
                    manifest = write_manifest(folder / f"scan-{unchanged}.jsonl", unchanged)
                    run = submit(manifest, server.url, pg_url, args.interval)
                    manifest.unlink()
                    result["runs"].append({"unchanged": unchanged, **run})
                    print(json.dumps({k: v for k, v in run.items() if k != "progress"}), flush=True)
        finally:
            server.stop()
    result["loadavg_end"] = loadavg()
    text = report(result)
    save_results(args.out, "incremental-scan", result, text)
    print(text)


def report(r: dict[str, Any]) -> str:
    machine = r["machine"]
    base, *runs = r["runs"]
    lines = [
        "# imagemill benchmark — producer memory over an incremental scan",
        "",
        f"`python -m bench.scale.incremental_scan --unchanged {' '.join(map(str, r['unchanged']))}"
        " --out bench/results`",
        "",
        f"Machine: {machine.get('cpus')} CPUs, {machine.get('memory_gib')} GiB, commit {machine.get('commit')}"
        f"{' (with uncommitted changes)' if machine.get('dirty') else ''}; Redis and PostgreSQL on the same"
        f" machine. Load average {r['loadavg_start']} at the start, {r['loadavg_end']} at the end.",
        "",
        "`imagemill submit MANIFEST --tasks moderation --sink postgresql://…` in a child process: a JSONL"
        " manifest of one changed object, then N unchanged objects whose records the sink holds (filled by"
        f" the server in {r['fill_s']} s, not timed). Peak RSS is the child's VmHWM at its exit (`bench.scale.peak`)."
        " *Progress moves*: how many times `status` (the registry, read every sample) saw the skipped count"
        " move while the producer ran.",
        "",
        "| manifest | peak RSS (MiB) | over the 2-line scan (MiB) | s | skipped | chunks | progress moves"
        " | first move (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in [base, *runs]:
        name = "2 lines (baseline)" if run is base else f"1 changed + {run['unchanged']:,} unchanged"
        over = "–" if run is base else f"{run['peak_mib'] - base['peak_mib']:+.1f}"
        first = run["first_progress_s"] if run["first_progress_s"] is not None else "–"
        lines.append(
            f"| {name} | {run['peak_mib']} | {over} | {run['wall_s']} | {run['skipped']:,} | {run['chunks']} |"
            f" {run['progress_moves_seen']} | {first} |"
        )
    goal = [run for run in runs if run["unchanged"] >= GOAL_OBJECTS]
    if goal:
        over = goal[-1]["peak_mib"] - base["peak_mib"]
        verdict = "✓ pass" if over <= GOAL_MIB else "✗ FAIL"
        lines += [
            "",
            f"Goal: the {GOAL_OBJECTS:,} run within {GOAL_MIB} MiB of the baseline: {over:+.1f} MiB, {verdict}.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
