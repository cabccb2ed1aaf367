"""Distributed mode's moving parts for one benchmark: a private redis-server, a fresh PostgreSQL
database, one `imagemill worker --gpus cpu`, and `imagemill submit --wait`, all owned by this run.
"""

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

from bench import REPO
from imagemill.core.broker import queue_depth
from imagemill.core.jobs import Job, JobRegistry
from tests.fixtures.postgres import admin_url, fresh_database
from tests.fixtures.redis import RedisServer
from tests.fixtures.workers import WorkerProcess, start_worker

JOB_ID = re.compile(r"^([0-9a-f]{12})$", re.MULTILINE)


@dataclass
class Stack:
    redis_url: str
    pg_url: str
    worker: WorkerProcess
    env: dict[str, str]  # what submit and the worker run with

    @property
    def registry(self) -> JobRegistry:
        return JobRegistry(self.redis_url)

    def worker_pid(self) -> int:
        return self.worker.process.pid


@contextmanager
def distributed_stack(scratch: Path, env: dict[str, str], name: str, images: Path) -> Iterator[Stack]:
    """Redis, a database and a ready worker that may read the local folder `images` (workers read no
    local path unless IMAGEMILL_ALLOWED_SOURCES lists it); everything stopped and dropped on the way out."""
    server = RedisServer(scratch / f"{name}-redis").start()
    try:
        with fresh_database(admin_url()) as pg_url:
            full = {
                **env,
                "IMAGEMILL_BROKER_URL": server.url,
                "IMAGEMILL_SINK": pg_url,
                "IMAGEMILL_ALLOWED_SOURCES": images.resolve().as_uri(),
            }
            worker = start_worker(full, scratch / f"{name}-worker.log")
            try:
                worker.wait_ready(timeout=180)
                yield Stack(server.url, pg_url, worker, full)
            finally:
                worker.stop()
    finally:
        server.stop()


@dataclass
class QueueWatch:
    """The deepest the queue got, polled on a thread."""

    url: str
    queue: str = "imagemill"
    interval: float = 0.1
    max_depth: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "QueueWatch":
        self._client = redis.Redis.from_url(self.url)
        self._thread = threading.Thread(target=self._run, name="bench-queue", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.max_depth = max(self.max_depth, queue_depth(self._client, self.queue))
            except redis.RedisError:
                pass
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()


@dataclass
class Submitted:
    job: Job
    wall_s: float
    output: str


def submit_and_wait(stack: Stack, source: str, tasks: str, chunk_size: int, timeout: float, *extra: str) -> Submitted:
    """`imagemill submit SOURCE --wait [EXTRA…]`; the finished job as the registry tells it."""
    args = [
        sys.executable,
        "-m",
        "imagemill",
        "submit",
        source,
        "--tasks",
        tasks,
        "--sink",
        stack.pg_url,
        "--chunk-size",
        str(chunk_size),
        "--wait",
        *extra,
    ]
    env = {**os.environ, **stack.env, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    started = time.perf_counter()
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    output = result.stdout + result.stderr
    match = JOB_ID.search(result.stdout)
    if result.returncode != 0 or not match:
        raise RuntimeError(
            f"submit exited with {result.returncode}:\n{output[-2000:]}\nworker log:\n{stack.worker.log[-3000:]}"
        )
    job = stack.registry.get(match.group(1))
    if job is None:
        raise RuntimeError(f"job {match.group(1)} is not in the registry")
    return Submitted(job, wall, output)


def record_count(pg_url: str, job_id: str) -> int:
    with psycopg.connect(pg_url) as conn:
        return conn.execute("select count(*) from imagemill_records where job_id = %s", (job_id,)).fetchone()[0]
