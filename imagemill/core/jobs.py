"""The job registry in Redis: what each job is, its state, and counters exact under concurrency.

Chunk completion is recorded once per chunk id (a Lua script), so a redelivered chunk never
counts twice; the job turns `done` when the producer has finished and every chunk is accounted for.
"""

import time
import uuid
from collections.abc import Callable, Mapping
from enum import StrEnum
from types import TracebackType
from typing import Any, Self, TypeVar, cast

from pydantic import BaseModel

from imagemill.core.connections import check_reachable, redis_client
from imagemill.core.redaction import redact_url
from imagemill.core.schemas import Task

T = TypeVar("T")
# redis-py's pipeline as a transaction's function gets it: commands run at once until `multi()`
# (the type stubs know only the queued mode, where each command returns the pipeline)
WatchingPipe = Any

PREFIX = "imagemill"
JOBS_INDEX = f"{PREFIX}:jobs"
REJECTED = f"{PREFIX}:rejected_messages"
SIGNATURES = f"{PREFIX}:signatures"
FAILED_PREFIX = "failed:"


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


# the job is done when listing has ended and every chunk is done or cancelled
_FINISH = """
local function finish(job, now)
  local f = redis.call('HMGET', job, 'state', 'listing_done', 'chunks_total', 'chunks_done', 'chunks_cancelled')
  if f[1] == 'running' and f[2] == '1'
     and tonumber(f[4] or 0) + tonumber(f[5] or 0) >= tonumber(f[3] or 0) then
    redis.call('HSET', job, 'state', 'done', 'finished_at', now)
  end
end
"""

# KEYS: job hash, set of finished chunks. ARGV: chunk id, now, then field/increment pairs.
_CHUNK_DONE = (
    _FINISH
    + """
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
for i = 3, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
finish(KEYS[1], ARGV[2])
return 1
"""
)

_END_LISTING = (
    _FINISH
    + """
redis.call('HSET', KEYS[1], 'listing_done', '1', 'chunks_total', ARGV[2], 'updated_at', ARGV[1])
finish(KEYS[1], ARGV[1])
return 1
"""
)


class Job(BaseModel):
    """A job as `status` shows it."""

    id: str
    source: str
    tasks: tuple[Task, ...]
    sink: str
    queue: str
    state: JobState
    signature: str | None = None
    error: str | None = None
    created_at: float
    started_at: float | None = None
    updated_at: float | None = None
    finished_at: float | None = None
    listing_done: bool = False
    listed: int = 0
    queued: int = 0
    skipped: int = 0
    annotated: int = 0
    failed: int = 0
    failed_by_kind: dict[str, int] = {}
    chunks_total: int = 0
    chunks_queued: int = 0
    chunks_done: int = 0
    chunks_cancelled: int = 0
    chunks_dead_lettered: int = 0
    producer_seen: float | None = None
    resume_after: str | None = None

    @property
    def processed(self) -> int:
        return self.annotated + self.failed

    @property
    def rate(self) -> float | None:
        """Images per second since the first chunk started."""
        if not self.started_at or not self.processed:
            return None
        end = self.finished_at or time.time()
        return self.processed / max(end - self.started_at, 1e-6)

    @property
    def eta_s(self) -> float | None:
        if self.state != JobState.RUNNING or not self.rate:
            return None
        return max(self.queued - self.processed, 0) / self.rate

    @classmethod
    def from_hash(cls, data: Mapping[str, str]) -> "Job":
        fields: dict[str, Any] = {k: v for k, v in data.items() if not k.startswith(FAILED_PREFIX) and v != ""}
        fields["tasks"] = tuple(t for t in fields.get("tasks", "").split(",") if t)
        fields["listing_done"] = fields.get("listing_done") == "1"
        fields["failed_by_kind"] = {
            k[len(FAILED_PREFIX) :]: int(v) for k, v in data.items() if k.startswith(FAILED_PREFIX) and int(v)
        }
        return cls.model_validate(fields)


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


class JobRegistry:
    """Jobs and their counters, kept in Redis where producers, workers and `status` all see them."""

    def __init__(self, url: str) -> None:
        self._url = url
        # a Redis restart is waited out (the connections module's backoff), not turned into a failed chunk
        self.redis = redis_client(url, decode_responses=True)
        self._chunk_done = self.redis.register_script(_CHUNK_DONE)
        self._end_listing = self.redis.register_script(_END_LISTING)

    def check(self) -> None:
        """Fail fast (UserError) when Redis cannot be reached, instead of retrying for a minute."""
        check_reachable(self._url)

    @staticmethod
    def key(job_id: str) -> str:
        return f"{PREFIX}:job:{job_id}"

    def create(
        self, job_id: str, source: str, tasks: tuple[Task, ...], sink: str, queue: str, *, idempotency_key: str = ""
    ) -> tuple[Job, bool]:
        """Register a job, or return the running one with the same idempotency key (and False)."""
        active = f"{PREFIX}:active:{idempotency_key or job_id}"
        now = time.time()
        fields: dict[str, str | float] = {
            "id": job_id,
            "source": source,
            "tasks": ",".join(tasks),
            "sink": sink,
            "queue": queue,
            "state": JobState.RUNNING.value,
            "created_at": now,
            "updated_at": now,
            "producer_seen": now,
        }

        def claim(pipe: WatchingPipe) -> str | None:
            existing: str | None = pipe.get(active)
            if existing and pipe.hget(self.key(existing), "state") == JobState.RUNNING.value:
                return existing
            pipe.multi()
            pipe.set(active, job_id)
            pipe.hset(self.key(job_id), mapping=fields)
            pipe.zadd(JOBS_INDEX, {job_id: now})
            return None

        existing = self._transaction(claim, active)
        job = self.get(existing or job_id)
        if job is None:  # written a moment ago: only a flushed or failed-over Redis loses it
            raise RuntimeError(f"job {existing or job_id} vanished from the registry at {redact_url(self._url)}")
        return job, existing is None

    def heartbeat(self, job_id: str) -> None:
        """The producer of this job is alive (it is listing or waiting for room in the queue)."""
        self.redis.hset(self.key(job_id), "producer_seen", time.time())

    def take_over(self, job_id: str, stale_after_s: float) -> bool:
        """Become the producer of a job whose producer stopped heartbeating; False if it is alive."""
        key = self.key(job_id)

        def claim(pipe: WatchingPipe) -> bool:
            listing_done, seen = pipe.hmget(key, "listing_done", "producer_seen")
            if listing_done == "1" or time.time() - float(seen or 0) < stale_after_s:
                return False
            pipe.multi()
            pipe.hset(key, "producer_seen", time.time())
            return True

        return self._transaction(claim, key)

    def get(self, job_id: str) -> Job | None:
        data = self.redis.hgetall(self.key(job_id))
        return Job.from_hash(data) if data else None

    def recent(self, limit: int = 20) -> list[Job]:
        ids = self.redis.zrevrange(JOBS_INDEX, 0, limit - 1)
        return [job for job in map(self.get, ids) if job]

    def state(self, job_id: str) -> JobState | None:
        value = self.redis.hget(self.key(job_id), "state")
        return JobState(value) if value else None

    def add_queued(self, job_id: str, listed: int, queued: int, skipped: int = 0, last_uri: str | None = None) -> None:
        """Count what the producer listed and enqueued; `last_uri` is where a successor resumes."""
        key = self.key(job_id)
        now = time.time()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hincrby(key, "listed", listed)
        pipe.hincrby(key, "queued", queued)
        pipe.hincrby(key, "skipped", skipped)
        pipe.hincrby(key, "chunks_queued", 1 if queued else 0)
        pipe.hset(
            key, mapping={"updated_at": now, "producer_seen": now, **({"resume_after": last_uri} if last_uri else {})}
        )
        pipe.execute()

    def end_listing(self, job_id: str, chunks_total: int) -> None:
        self._end_listing(keys=[self.key(job_id)], args=[time.time(), chunks_total])

    def chunk_started(self, job_id: str, signature: str) -> None:
        pipe = self.redis.pipeline()
        pipe.hsetnx(self.key(job_id), "started_at", time.time())
        pipe.hsetnx(self.key(job_id), "signature", signature)
        pipe.execute()

    def chunk_done(
        self, job_id: str, chunk_id: str, outcomes: Mapping[str, int], *, dead_lettered: bool = False
    ) -> bool:
        """Count a finished chunk once; False when it had been counted already (a redelivery)."""
        increments: list[str | int] = ["chunks_done", 1, "chunks_dead_lettered", int(dead_lettered)]
        for outcome, count in outcomes.items():
            if outcome == "annotated":
                increments += ["annotated", count]
            else:
                increments += ["failed", count, FAILED_PREFIX + outcome, count]
        args = [chunk_id, time.time(), *increments]
        return bool(self._chunk_done(keys=[self.key(job_id), self.key(job_id) + ":chunks"], args=args))

    def begin_attempt(self, job_id: str, chunk_id: str) -> int:
        """Count a delivery of a chunk; returns 1 + how many earlier deliveries died mid-chunk."""
        return int(self.redis.hincrby(self.key(job_id) + ":attempts", chunk_id, 1))

    def end_attempt(self, job_id: str, chunk_id: str) -> None:
        """The attempt ended in this process (done or raised): it was not a worker death."""
        self.redis.hincrby(self.key(job_id) + ":attempts", chunk_id, -1)

    def publish_signature(self, pipeline: str, signature: str) -> None:
        """What the models a worker loaded for a pipeline make of it (producers skip by it)."""
        self.redis.hset(SIGNATURES, pipeline, signature)

    def signature_for(self, pipeline: str) -> str | None:
        return self.redis.hget(SIGNATURES, pipeline)

    def count_rejected(self) -> int:
        """A message that was refused unexecuted (wrong shape, foreign serializer)."""
        return int(self.redis.incr(REJECTED))

    def rejected(self) -> int:
        return int(self.redis.get(REJECTED) or 0)

    def chunk_cancelled(self, job_id: str, chunk_id: str) -> bool:
        args = [chunk_id, time.time(), "chunks_cancelled", 1]
        return bool(self._chunk_done(keys=[self.key(job_id), self.key(job_id) + ":chunks"], args=args))

    def cancel(self, job_id: str) -> bool:
        """Stop a running job: chunks not yet started are dropped. False if it was not running."""
        return self._transition(job_id, JobState.CANCELLED)

    def fail(self, job_id: str, error: str) -> bool:
        self.redis.hset(self.key(job_id), "error", error)
        return self._transition(job_id, JobState.FAILED)

    def _transition(self, job_id: str, state: JobState) -> bool:
        key = self.key(job_id)

        def move(pipe: WatchingPipe) -> bool:
            if pipe.hget(key, "state") != JobState.RUNNING.value:
                return False
            pipe.multi()
            pipe.hset(key, mapping={"state": state.value, "finished_at": time.time()})
            return True

        return self._transaction(move, key)

    def _transaction(self, func: Callable[[WatchingPipe], T], *watched: str) -> T:
        """`func`'s result, run as an optimistic transaction: retried while a watched key changes under it."""
        # the type stubs leave `transaction` unannotated
        transaction: Callable[..., Any] = self.redis.transaction
        return cast(T, transaction(func, *watched, value_from_callable=True))

    def close(self) -> None:
        """Close the connections (the next call opens new ones)."""
        self.redis.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
