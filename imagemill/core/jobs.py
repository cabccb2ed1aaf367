"""The job registry in Redis: what each job is, its state, and counters exact under concurrency.

Chunk completion is recorded once per chunk id (a Lua script), so a redelivered chunk never
counts twice; the job turns `done` when the producer has finished and every chunk is accounted for.
"""

import time
import uuid
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any, TypeVar, cast

from pydantic import BaseModel

from imagemill.core.closing import Closing
from imagemill.core.connections import check_reachable, redis_client
from imagemill.core.credentials import without_credentials
from imagemill.core.redaction import redact_url
from imagemill.core.schemas import Task
from imagemill.core.settings import get_settings

T = TypeVar("T")
# redis-py's pipeline as a transaction's function gets it: commands run at once until `multi()`
# (the type stubs know only the queued mode, where each command returns the pipeline)
WatchingPipe = Any

PREFIX = "imagemill"
JOBS_INDEX = f"{PREFIX}:jobs"
# job id -> when its finished job expires: the index entries to drop once the job's keys are gone
JOBS_EXPIRING = f"{PREFIX}:jobs:expiring"
# idempotency key -> the id of the running job with that key (submitting it again attaches)
ACTIVE = f"{PREFIX}:active"
REJECTED = f"{PREFIX}:rejected_messages"
SIGNATURES = f"{PREFIX}:signatures"
FAILED_PREFIX = "failed:"


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


# Every job owns these keys: KEYS[1] the job hash, KEYS[2] its set of finished chunks, KEYS[3] its
# attempts hash; then the shared ACTIVE hash, JOBS_EXPIRING and JOBS_INDEX. `finish` ends a job in
# the same script that changes its state: every key of the job gets EXPIRE(retention), its
# idempotency key is released, and index entries of jobs expired by now are dropped.
_FINISH = """
local function prune(now)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, 1000)
  if #gone > 0 then
    redis.call('ZREM', KEYS[6], unpack(gone))
    redis.call('ZREM', KEYS[5], unpack(gone))
  end
end

local function finish(state, now, retention, error)
  redis.call('HSET', KEYS[1], 'state', state, 'finished_at', now, 'retention_s', retention)
  if error ~= '' then redis.call('HSET', KEYS[1], 'error', error) end
  local id = redis.call('HGET', KEYS[1], 'id')
  local idem = redis.call('HGET', KEYS[1], 'idempotency_key')
  if idem and redis.call('HGET', KEYS[4], idem) == id then redis.call('HDEL', KEYS[4], idem) end
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], retention) end
  if id then redis.call('ZADD', KEYS[5], tonumber(now) + tonumber(retention), id) end
  prune(now)
end

-- the job is done when listing has ended and every chunk is done or cancelled
local function finish_if_complete(now, retention)
  local f = redis.call('HMGET', KEYS[1], 'state', 'listing_done', 'chunks_total', 'chunks_done', 'chunks_cancelled')
  if f[1] == 'running' and f[2] == '1'
     and tonumber(f[4] or 0) + tonumber(f[5] or 0) >= tonumber(f[3] or 0) then
    finish('done', now, retention, '')
  end
end

-- a key of a finished job created or grown after it finished expires with the job
local function follow_job_ttl()
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then
    for i = 2, 3 do
      if redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], ttl) end
    end
  end
end
"""

# ARGV: chunk id, now, retention, then field/increment pairs.
_CHUNK_DONE = (
    _FINISH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
for i = 4, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
finish_if_complete(ARGV[2], ARGV[3])
follow_job_ttl()
return 1
"""
)

# ARGV: now, retention, chunks total
_END_LISTING = (
    _FINISH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'listing_done', '1', 'chunks_total', ARGV[3], 'updated_at', ARGV[1])
finish_if_complete(ARGV[1], ARGV[2])
return 1
"""
)

# ARGV: state, now, retention, error. Running -> state; 0 when the job was not running.
_TRANSITION = (
    _FINISH
    + """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
finish(ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return 1
"""
)

# ARGV: now, then (op, field, value) triples; op `+` HINCRBY, `=` HSET, `?` HSETNX. Only a job that
# exists is updated, so a late write never recreates a job that expired.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 2, #ARGV, 3 do
  local op, field, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == '+' then redis.call('HINCRBY', KEYS[1], field, value)
  elseif op == '=' then redis.call('HSET', KEYS[1], field, value)
  else redis.call('HSETNX', KEYS[1], field, value) end
end
return 1
"""

# KEYS: job hash, attempts hash. ARGV: chunk id, increment. The attempts hash of a finished job
# expires with it.
_ATTEMPT = """
local n = redis.call('HINCRBY', KEYS[2], ARGV[1], ARGV[2])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return n
"""

# KEYS: JOBS_EXPIRING, JOBS_INDEX. ARGV: now. Drops index entries of expired jobs.
_PRUNE = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1000)
if #gone > 0 then
  redis.call('ZREM', KEYS[2], unpack(gone))
  redis.call('ZREM', KEYS[1], unpack(gone))
end
return #gone
"""


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
    retention_s: float | None = None  # set when the job finishes: its keys expire this long after

    @property
    def expires_at(self) -> float | None:
        """When a finished job's keys expire from Redis; None while it runs."""
        if self.finished_at is None or self.retention_s is None:
            return None
        return self.finished_at + self.retention_s

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


class JobRegistry(Closing):
    """Jobs and their counters, kept in Redis where producers, workers and `status` all see them."""

    def __init__(self, url: str, retention_s: int | None = None) -> None:
        """`retention_s`: how long a finished job is kept (default IMAGEMILL_JOB_RETENTION)."""
        self._url = url
        self.retention_s = retention_s if retention_s is not None else get_settings().job_retention
        # a Redis restart is waited out (the connections module's backoff), not turned into a failed chunk
        self.redis = redis_client(url, decode_responses=True)
        self._chunk_done = self.redis.register_script(_CHUNK_DONE)
        self._end_listing = self.redis.register_script(_END_LISTING)
        self._transition_script = self.redis.register_script(_TRANSITION)
        self._update = self.redis.register_script(_UPDATE)
        self._attempt = self.redis.register_script(_ATTEMPT)
        self._prune = self.redis.register_script(_PRUNE)

    def check(self) -> None:
        """Fail fast (UserError) when Redis cannot be reached, instead of retrying for a minute."""
        check_reachable(self._url)

    @staticmethod
    def key(job_id: str) -> str:
        return f"{PREFIX}:job:{job_id}"

    @classmethod
    def job_keys(cls, job_id: str) -> list[str]:
        """Every key a job owns, then the shared ones its end touches (the KEYS of the finishing scripts)."""
        key = cls.key(job_id)
        return [key, f"{key}:chunks", f"{key}:attempts", ACTIVE, JOBS_EXPIRING, JOBS_INDEX]

    def create(
        self, job_id: str, source: str, tasks: tuple[Task, ...], sink: str, queue: str, *, idempotency_key: str = ""
    ) -> tuple[Job, bool]:
        """Register a job, or return the running one with the same idempotency key (and False)."""
        idem = idempotency_key or job_id
        now = time.time()
        fields: dict[str, str | float] = {
            "id": job_id,
            "source": source,
            "tasks": ",".join(tasks),
            # the password stays in the environments of those who write: anyone who reads Redis reads this
            "sink": without_credentials(sink),
            "queue": queue,
            "state": JobState.RUNNING.value,
            "created_at": now,
            "updated_at": now,
            "producer_seen": now,
            "idempotency_key": idem,
        }

        def claim(pipe: WatchingPipe) -> str | None:
            existing: str | None = pipe.hget(ACTIVE, idem)
            if existing and pipe.hget(self.key(existing), "state") == JobState.RUNNING.value:
                return existing
            pipe.multi()
            pipe.hset(ACTIVE, idem, job_id)
            pipe.hset(self.key(job_id), mapping=fields)
            pipe.zadd(JOBS_INDEX, {job_id: now})
            return None

        existing = self._transaction(claim, ACTIVE)
        job = self.get(existing or job_id)
        if job is None:  # written a moment ago: only a flushed or failed-over Redis loses it
            raise RuntimeError(f"job {existing or job_id} vanished from the registry at {redact_url(self._url)}")
        return job, existing is None

    def heartbeat(self, job_id: str) -> None:
        """The producer of this job is alive (it is listing or waiting for room in the queue)."""
        self._set(job_id, producer_seen=time.time())

    def take_over(self, job_id: str, stale_after_s: float) -> bool:
        """Become the producer of a job whose producer stopped heartbeating; False if it is alive."""
        key = self.key(job_id)

        def claim(pipe: WatchingPipe) -> bool:
            listing_done, seen = pipe.hmget(key, "listing_done", "producer_seen")
            if seen is None or listing_done == "1" or time.time() - float(seen) < stale_after_s:
                return False
            pipe.multi()
            pipe.hset(key, "producer_seen", time.time())
            return True

        return self._transaction(claim, key)

    def get(self, job_id: str) -> Job | None:
        data = self.redis.hgetall(self.key(job_id))
        return Job.from_hash({_text(k): _text(v) for k, v in data.items()}) if data else None

    def recent(self, limit: int = 20) -> list[Job]:
        self.prune()
        # without scores the reply is a list of members (redis-py types every zrange shape at once)
        ids = cast("list[bytes | str]", self.redis.zrevrange(JOBS_INDEX, 0, limit - 1))
        return [job for job in map(self.get, map(_text, ids)) if job]

    def prune(self) -> int:
        """Drop the index entries of jobs whose keys have expired; how many. (Finishing a job prunes too.)"""
        return int(self._prune(keys=[JOBS_EXPIRING, JOBS_INDEX], args=[time.time()]))

    def state(self, job_id: str) -> JobState | None:
        value = self.redis.hget(self.key(job_id), "state")
        return JobState(_text(value)) if value else None

    def add_queued(self, job_id: str, listed: int, queued: int, skipped: int = 0, last_uri: str | None = None) -> None:
        """Count what the producer listed and enqueued; `last_uri` is where a successor resumes."""
        now = time.time()
        ops: list[str | int | float] = ["+", "listed", listed, "+", "queued", queued, "+", "skipped", skipped]
        ops += ["+", "chunks_queued", 1 if queued else 0, "=", "updated_at", now, "=", "producer_seen", now]
        if last_uri:
            ops += ["=", "resume_after", last_uri]
        self._update(keys=[self.key(job_id)], args=[now, *ops])

    def end_listing(self, job_id: str, chunks_total: int) -> None:
        self._end_listing(keys=self.job_keys(job_id), args=[time.time(), self.retention_s, chunks_total])

    def chunk_started(self, job_id: str, signature: str) -> None:
        now = time.time()
        self._update(keys=[self.key(job_id)], args=[now, "?", "started_at", now, "?", "signature", signature])

    def _set(self, job_id: str, **fields: str | float) -> None:
        """HSET on a job that exists (a late write never recreates an expired job)."""
        args: list[str | float] = [time.time()]
        for name, value in fields.items():
            args += ["=", name, value]
        self._update(keys=[self.key(job_id)], args=args)

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
        args = [chunk_id, time.time(), self.retention_s, *increments]
        return bool(self._chunk_done(keys=self.job_keys(job_id), args=args))

    def begin_attempt(self, job_id: str, chunk_id: str) -> int:
        """Count a delivery of a chunk; returns 1 + how many earlier deliveries died mid-chunk."""
        return int(self._attempt(keys=self._attempt_keys(job_id), args=[chunk_id, 1]))

    def end_attempt(self, job_id: str, chunk_id: str) -> None:
        """The attempt ended in this process (done or raised): it was not a worker death."""
        self._attempt(keys=self._attempt_keys(job_id), args=[chunk_id, -1])

    def _attempt_keys(self, job_id: str) -> list[str]:
        """The KEYS of the attempt script: the job's hash and its attempts hash."""
        key, _chunks, attempts, *_shared = self.job_keys(job_id)
        return [key, attempts]

    def publish_signature(self, pipeline: str, signature: str) -> None:
        """What the models a worker loaded for a pipeline make of it (producers skip by it)."""
        self.redis.hset(SIGNATURES, pipeline, signature)

    def signature_for(self, pipeline: str) -> str | None:
        value = self.redis.hget(SIGNATURES, pipeline)
        return _text(value) if value is not None else None

    def count_rejected(self) -> int:
        """A message that was refused unexecuted (wrong shape, foreign serializer)."""
        return int(self.redis.incr(REJECTED))

    def rejected(self) -> int:
        return int(self.redis.get(REJECTED) or 0)

    def chunk_cancelled(self, job_id: str, chunk_id: str) -> bool:
        args: list[str | float] = [chunk_id, time.time(), self.retention_s, "chunks_cancelled", 1]
        return bool(self._chunk_done(keys=self.job_keys(job_id), args=args))

    def cancel(self, job_id: str) -> bool:
        """Stop a running job: chunks not yet started are dropped. False if it was not running."""
        return self._transition(job_id, JobState.CANCELLED)

    def fail(self, job_id: str, error: str) -> bool:
        """Fail a running job with `error` (the reason `status` shows). False if it was not running."""
        return self._transition(job_id, JobState.FAILED, error)

    def _transition(self, job_id: str, state: JobState, error: str = "") -> bool:
        """Running -> `state`, with the job's keys set to expire, in one script. False if not running."""
        args: list[str | float] = [state.value, time.time(), self.retention_s, error]
        return bool(self._transition_script(keys=self.job_keys(job_id), args=args))

    def _transaction(self, func: Callable[[WatchingPipe], T], *watched: str) -> T:
        """`func`'s result, run as an optimistic transaction: retried while a watched key changes under it."""
        # the type stubs leave `transaction` unannotated
        transaction: Callable[..., Any] = self.redis.transaction
        return cast(T, transaction(func, *watched, value_from_callable=True))

    def close(self) -> None:
        """Close the connections (the next call opens new ones)."""
        self.redis.close()


def _text(value: bytes | str) -> str:
    """A reply as text: the registry's client decodes responses, but redis-py types them bytes or str."""
    return value.decode() if isinstance(value, bytes) else value
