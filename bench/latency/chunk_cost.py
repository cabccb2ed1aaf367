"""A worker's fixed cost per chunk: `run_chunk` called in this process on chunks of one image and of many.

    python -m bench.latency.chunk_cost --chunks 40 --profile

The chunk path as a worker's pool child runs it (the job registry in a private redis-server, the
records in a fresh PostgreSQL database, the tiny models, the Prometheus middleware), without Celery's
own overhead: each chunk is one `run_chunk` call on a `ChunkMessage` like the watcher's (one image,
the urgent lane, an upload event time) or the backfill's (`--big` images). Reported per chunk: the
wall seconds and the CPU seconds of this process (every thread's), their medians; the fixed cost is
a one-image chunk's time less one image's share of a big chunk's. `--profile` prints cProfile's
top functions over the one-image chunks (cumulative time).
"""

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import DEFAULT_CACHE
from bench.models import tiny_set
from tests.fixtures.images import photo_jpeg
from tests.fixtures.postgres import admin_url, fresh_database
from tests.fixtures.redis import RedisServer

TASKS = "caption,moderation,tags"


def measure(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    models = tiny_set(args.cache)
    folder = scratch / "images"
    folder.mkdir()
    paths = []
    for seed in range(max(args.big, args.chunks)):
        path = folder / f"img_{seed:04d}.jpg"
        path.write_bytes(photo_jpeg(320, 240, seed=seed % 16))
        paths.append(path)
    redis_server = RedisServer(scratch / "redis", appendonly=False).start()
    try:
        with fresh_database(admin_url()) as pg_url:
            os.environ.update(
                models.env(),
                IMAGEMILL_CAPTION_MAX_NEW_TOKENS="6",
                IMAGEMILL_BATCH_SIZE="16",
                IMAGEMILL_DEVICE="cpu",
                IMAGEMILL_BROKER_URL=redis_server.url,
                IMAGEMILL_SINK=pg_url,
                IMAGEMILL_ALLOWED_SOURCES=f"{folder.resolve().as_uri()}/",
            )
            if args.worker:
                return _run_worker(args, paths, pg_url, scratch)
            return _run(args, paths, pg_url)
    finally:
        redis_server.stop()


def _run(args: argparse.Namespace, paths: list[Path], pg_url: str) -> dict[str, Any]:
    # imported once the environment is set: the settings are read at import
    from imagemill.core.lanes import Lane
    from imagemill.core.schemas import ChunkMessage, ImageRef
    from imagemill.core.tasks import Task
    from imagemill.worker.chunks import run_chunk
    from imagemill.worker.runtime import runtime

    rt = runtime()
    tasks = tuple(Task(name) for name in TASKS.split(","))
    rt.load(tasks)
    registry = rt.registry
    uploads_job, backfill_job = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
    registry.create(uploads_job, "sqs://bench", tasks, pg_url, rt.settings.queue, lane=Lane.URGENT)
    registry.create(backfill_job, "file://bench", tasks, pg_url, rt.settings.queue, lane=Lane.BACKFILL)
    uris = [path.resolve().as_uri() for path in paths]
    sequence = iter(range(10**9))

    def one(index: int) -> ChunkMessage:
        now = time.time()
        ref = ImageRef(uri=uris[index % len(uris)], event_time=now)
        chunk_id = f"{uploads_job}/{next(sequence)}"
        return ChunkMessage(
            job_id=uploads_job, chunk_id=chunk_id, tasks=tasks, refs=[ref], lane=Lane.URGENT, enqueued_at=now
        )

    def big() -> ChunkMessage:
        refs = [ImageRef(uri=uri) for uri in uris[: args.big]]
        chunk_id = f"{backfill_job}/{next(sequence)}"
        return ChunkMessage(
            job_id=backfill_job, chunk_id=chunk_id, tasks=tasks, refs=refs, lane=Lane.BACKFILL, enqueued_at=time.time()
        )

    parts: list[dict[str, float]] = []
    big_parts: list[dict[str, float]] = []

    def timed(chunk: ChunkMessage) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        figures = run_chunk(chunk, rt).figures
        took, used = time.perf_counter() - wall, time.process_time() - cpu
        # where a chunk's wall time went (per image): the run loop's parts, and around it the registry,
        # the rate sample and the metrics
        n = len(chunk.refs)
        (parts if n == 1 else big_parts).append(
            {
                name: seconds / n
                for name, seconds in {
                    "models": figures.model_s,
                    "waiting for input": figures.starved_s,
                    "write": figures.stage("write"),
                    "rest of the run loop": figures.wall_s - figures.accounted_s,
                    "around the run loop": took - figures.wall_s,
                }.items()
            }
        )
        return took, used

    for index in range(3):  # warm: caches, connections, the first batch's allocations
        timed(one(index))
    timed(big())
    big_times = [timed(big()) for _ in range(args.big_chunks)]
    profiler = cProfile.Profile() if args.profile else None
    one_times = []
    for index in range(args.chunks):
        chunk = one(index)
        if profiler is not None:
            profiler.enable()
        one_times.append(timed(chunk))
        if profiler is not None:
            profiler.disable()
    if profiler is not None:
        stats = pstats.Stats(profiler).sort_stats("cumulative")
        stats.print_stats(args.top)
        stats.sort_stats("tottime").print_stats(args.top)
    rt.close()
    one_wall = statistics.median(wall for wall, _ in one_times)
    one_cpu = statistics.median(cpu for _, cpu in one_times)
    big_wall = statistics.median(wall for wall, _ in big_times)
    big_cpu = statistics.median(cpu for _, cpu in big_times)
    parts = parts[-args.chunks :]
    return {
        "one_image_wall_s_parts": {name: round(statistics.median(p[name] for p in parts), 4) for name in parts[0]},
        "big_chunk_wall_s_parts_per_image": {
            name: round(statistics.median(p[name] for p in big_parts[1:]), 4) for name in big_parts[0]
        },
        **fixed_cost(one_wall, one_cpu, big_wall, big_cpu, args.big),
    }


def _run_worker(args: argparse.Namespace, paths: list[Path], pg_url: str, scratch: Path) -> dict[str, Any]:
    """The same chunks sent through the broker to `imagemill worker --gpus cpu`, one at a time; the
    worker's CPU seconds (its whole process tree: Celery's main process and the pool child) per chunk."""
    # imported once `measure` has set the environment: the settings are read at import
    from bench.latency.uploads import tree_cpu_s
    from imagemill.core.broker import CHUNK_TASK, make_celery
    from imagemill.core.jobs import JobRegistry
    from imagemill.core.lanes import Lane
    from imagemill.core.schemas import ChunkMessage, ImageRef
    from imagemill.core.settings import Settings
    from imagemill.core.tasks import Task
    from tests.fixtures.workers import start_worker

    settings = Settings()
    env = {key: value for key, value in os.environ.items() if key.startswith(("IMAGEMILL_", "HF_"))}
    worker = start_worker(env, scratch / "worker.log")
    registry = JobRegistry(settings.registry_url)
    celery = make_celery(settings)
    tasks = tuple(Task(name) for name in TASKS.split(","))
    uris = [path.resolve().as_uri() for path in paths]
    try:
        worker.wait_ready(timeout=300)
        jobs = {}
        for lane in (Lane.URGENT, Lane.BACKFILL):
            jobs[lane] = uuid.uuid4().hex[:12]
            registry.create(jobs[lane], f"bench://{lane}", tasks, pg_url, settings.queue, lane=lane)
        sent = dict.fromkeys(jobs, 0)

        def send(lane: Lane, count: int) -> None:
            now = time.time()
            event = now if lane == Lane.URGENT else None
            refs = [ImageRef(uri=uri, event_time=event) for uri in uris[:count]]
            chunk_id = f"{jobs[lane]}/{sent[lane]}"
            sent[lane] += 1
            message = ChunkMessage(
                job_id=jobs[lane], chunk_id=chunk_id, tasks=tasks, refs=refs, lane=lane, enqueued_at=now
            ).model_dump(mode="json")
            celery.send_task(CHUNK_TASK, args=[message], queue=settings.queue, priority=lane.priority)
            deadline = time.monotonic() + 120
            while True:
                job = registry.get(jobs[lane])
                if job is not None and job.chunks_done >= sent[lane]:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"chunk {chunk_id} not done after 120 s:\n{worker.log[-3000:]}")
                time.sleep(0.002)

        def cpu_per_chunk(lane: Lane, count: int, chunks: int) -> tuple[float, float]:
            wall, cpu = time.perf_counter(), tree_cpu_s(worker.process.pid)
            for _ in range(chunks):
                send(lane, count)
            return (time.perf_counter() - wall) / chunks, (tree_cpu_s(worker.process.pid) - cpu) / chunks

        for _ in range(3):
            send(Lane.URGENT, 1)
        send(Lane.BACKFILL, args.big)
        big_wall, big_cpu = cpu_per_chunk(Lane.BACKFILL, args.big, args.big_chunks)
        one_wall, one_cpu = cpu_per_chunk(Lane.URGENT, 1, args.chunks)
    finally:
        worker.stop()
        registry.close()
    return fixed_cost(one_wall, one_cpu, big_wall, big_cpu, args.big)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=40, help="one-image chunks to time")
    parser.add_argument("--big", type=int, default=64, help="images in a backfill chunk")
    parser.add_argument("--big-chunks", type=int, default=3, help="backfill chunks to time")
    parser.add_argument("--worker", action="store_true", help="through the broker to a worker process")
    parser.add_argument("--profile", action="store_true", help="cProfile the one-image chunks")
    parser.add_argument("--top", type=int, default=40, help="profile lines to print")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chunk-cost-") as scratch:
        for name, value in measure(args, Path(scratch)).items():
            print(f"{name}: {value}")


if __name__ == "__main__":
    main()


def fixed_cost(one_wall: float, one_cpu: float, big_wall: float, big_cpu: float, big: int) -> dict[str, float]:
    """A one-image chunk's wall and CPU seconds, a `big`-image chunk's, and the fixed cost: the one-image
    chunk less one image's share of the big one."""
    return {
        "one_image_wall_s": round(one_wall, 4),
        "one_image_cpu_s": round(one_cpu, 4),
        f"{big}_images_wall_s": round(big_wall, 4),
        f"{big}_images_cpu_s": round(big_cpu, 4),
        "fixed_wall_s": round(one_wall - big_wall / big, 4),
        "fixed_cpu_s": round(one_cpu - big_cpu / big, 4),
    }
