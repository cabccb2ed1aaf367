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

from imagemill.core.accounting import Figures
from imagemill.core.closing import Closing
from imagemill.core.connections import check_reachable, redis_client
from imagemill.core.credentials import without_credentials
from imagemill.core.jobs_lua import (
    ATTEMPT,
    BEGIN_CHUNK,
    CHUNK_DONE,
    END_CHUNK,
    END_LISTING,
    FAIR_TURN,
    PRUNE,
    RESERVE,
    TRANSITION,
    UPDATE,
)
from imagemill.core.lanes import DEFAULT_LANE, Lane
from imagemill.core.rates import KEPT as RATES_KEPT
from imagemill.core.rates import PREFIX as RATES_PREFIX
from imagemill.core.rates import RateSample
from imagemill.core.redaction import redact_url
from imagemill.core.settings import get_settings
from imagemill.core.tasks import Task

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
# the latency samples `status` reads: the newest of each kind, per job and per lane
LATENCY_SAMPLES = 1000
LATENCY_KINDS = ("queue_wait", "upload_to_record")
ACCOUNTING_PREFIX = "a:"  # the job's accounting figures and cost, summed over its chunks
WORKER_PREFIX = "w:"  # w:<worker>|<figure>: one worker process's share


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"
    OVER_BUDGET = "over_budget"  # its spend reached its budget: the chunks not started were not run


class Job(BaseModel):
    """A job as `status` shows it."""

    id: str
    source: str
    tasks: tuple[Task, ...]
    sink: str
    queue: str
    lane: Lane = DEFAULT_LANE
    share: int = 1  # its weight in its lane's fair share
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
    budget: float | None = None  # the job stops (over_budget) once its cost reaches this
    continues: str | None = None  # the job this one goes on from (after it went over its budget)
    spent_before: float = 0.0  # what the jobs it continues spent (its budget is the rest of the total)
    accounting: dict[str, float] = {}  # `Figures.fields()` summed over its chunks, and `cost`
    workers: dict[str, dict[str, float]] = {}  # the same per worker process

    @property
    def figures(self) -> Figures:
        """Its chunks' accounting, summed (every worker's)."""
        return Figures.from_fields(self.accounting)

    @property
    def cost(self) -> float | None:
        """What its chunks cost so far (IMAGEMILL_COST_PER_HOUR of each worker); None without a price."""
        return self.accounting.get("cost")

    @property
    def cost_per_1000(self) -> float | None:
        if self.cost is None or not self.processed:
            return None
        return self.cost * 1000 / self.processed

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
        prefixes = (FAILED_PREFIX, ACCOUNTING_PREFIX, WORKER_PREFIX)
        fields: dict[str, Any] = {k: v for k, v in data.items() if not k.startswith(prefixes) and v != ""}
        fields["tasks"] = tuple(t for t in fields.get("tasks", "").split(",") if t)
        fields["listing_done"] = fields.get("listing_done") == "1"
        fields["failed_by_kind"] = {
            k[len(FAILED_PREFIX) :]: int(v) for k, v in data.items() if k.startswith(FAILED_PREFIX) and int(v)
        }
        fields["accounting"] = {
            k[len(ACCOUNTING_PREFIX) :]: float(v) for k, v in data.items() if k.startswith(ACCOUNTING_PREFIX)
        }
        workers: dict[str, dict[str, float]] = {}
        for k, v in data.items():
            if k.startswith(WORKER_PREFIX):
                worker, _, name = k[len(WORKER_PREFIX) :].rpartition("|")
                workers.setdefault(worker, {})[name] = float(v)
        fields["workers"] = workers
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
        self._chunk_done = self.redis.register_script(CHUNK_DONE)
        self._end_listing = self.redis.register_script(END_LISTING)
        self._transition_script = self.redis.register_script(TRANSITION)
        self._update = self.redis.register_script(UPDATE)
        self._attempt = self.redis.register_script(ATTEMPT)
        self._prune = self.redis.register_script(PRUNE)
        self._reserve = self.redis.register_script(RESERVE)
        self._fair_turn = self.redis.register_script(FAIR_TURN)
        self._begin_chunk = self.redis.register_script(BEGIN_CHUNK)
        self._end_chunk = self.redis.register_script(END_CHUNK)

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
        self,
        job_id: str,
        source: str,
        tasks: tuple[Task, ...],
        sink: str,
        queue: str,
        *,
        idempotency_key: str = "",
        lane: Lane = DEFAULT_LANE,
        share: int = 1,
        budget: float | None = None,
        continues: str | None = None,
        spent_before: float = 0.0,
    ) -> tuple[Job, bool]:
        """Register a job, or return the running one with the same idempotency key (and False; it
        keeps its own lane and share). `budget`: its cost cap; `continues`: the job it goes on from."""
        idem = idempotency_key or job_id
        now = time.time()
        fields: dict[str, str | float] = {
            "id": job_id,
            "source": source,
            "tasks": ",".join(tasks),
            # the password stays in the environments of those who write: anyone who reads Redis reads this
            "sink": without_credentials(sink),
            "queue": queue,
            "lane": lane.value,
            "share": share,
            "state": JobState.RUNNING.value,
            "created_at": now,
            "updated_at": now,
            "producer_seen": now,
            "idempotency_key": idem,
        }
        if budget is not None:
            fields["budget"] = budget
        if continues:
            fields["continues"] = continues
            fields["spent_before"] = spent_before

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

    def reserve_chunks(self, job_id: str, count: int = 1) -> int | None:
        """The first of `count` chunk numbers no other producer of this job gets (watchers of one
        job enqueue side by side); None when the job is gone."""
        first = int(self._reserve(keys=[self.key(job_id)], args=[count]))
        return None if first < 0 else first

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

    def begin_chunk(
        self, job_id: str, chunk_id: str, signature: str, lane: Lane, queue_wait_s: float | None = None
    ) -> int:
        """A worker starts a delivery of a chunk, in one round trip: `begin_attempt`, `chunk_started`
        and the queue wait kept as `add_latencies` keeps it (None: not known). Returns what
        `begin_attempt` does: 1 + how many earlier deliveries died mid-chunk."""
        keys = [*self._attempt_keys(job_id)]
        keys += [self.latency_key("queue_wait", job_id=job_id), self.latency_key("queue_wait", lane=lane)]
        args: list[str | float] = [chunk_id, time.time(), signature, self.retention_s, LATENCY_SAMPLES]
        if queue_wait_s is not None:
            args.append(f"{queue_wait_s:.4f}")
        return int(self._begin_chunk(keys=keys, args=args))

    def end_chunk(
        self,
        job_id: str,
        chunk_id: str,
        outcomes: Mapping[str, int],
        *,
        lane: Lane = DEFAULT_LANE,
        dead_lettered: bool = False,
        figures: Mapping[str, float] | None = None,
        worker: str = "",
        upload_to_record_s: list[float] | None = None,
        rate: RateSample | None = None,
    ) -> bool:
        """A worker ends a delivery whose records are written, in one round trip: `chunk_done` (False
        when the chunk had been counted), its `upload_to_record_s` samples kept for the job and `lane`
        only when counted now, the `rate` sample kept for `imagemill estimate`, and `end_attempt`."""
        samples = [f"{value:.4f}" for value in upload_to_record_s or ()]
        keys = self.job_keys(job_id)
        keys += [self.latency_key("upload_to_record", job_id=job_id), self.latency_key("upload_to_record", lane=lane)]
        keys.append(RATES_PREFIX + rate.key if rate is not None else RATES_PREFIX)
        args: list[str | int | float] = [chunk_id, time.time(), self.retention_s, LATENCY_SAMPLES, len(samples)]
        args += [*samples, rate.to_json() if rate is not None else "", RATES_KEPT]
        args += self._increments(outcomes, dead_lettered, figures, worker)
        return bool(self._end_chunk(keys=keys, args=args))

    def chunk_done(
        self,
        job_id: str,
        chunk_id: str,
        outcomes: Mapping[str, int],
        *,
        dead_lettered: bool = False,
        figures: Mapping[str, float] | None = None,
        worker: str = "",
    ) -> bool:
        """Count a finished chunk once; False when it had been counted already (a redelivery).

        `figures` (the chunk's `Figures.fields()` and its `cost`) are added to the job's and, under
        `worker`, to that worker's, in the same step; a job whose cost reaches its budget ends
        `over_budget` there."""
        increments = self._increments(outcomes, dead_lettered, figures, worker)
        args = [chunk_id, time.time(), self.retention_s, *increments]
        return bool(self._chunk_done(keys=self.job_keys(job_id), args=args))

    @staticmethod
    def _increments(
        outcomes: Mapping[str, int], dead_lettered: bool, figures: Mapping[str, float] | None, worker: str
    ) -> list[str | int | float]:
        """The field/increment pairs that count a finished chunk (the ARGV tail of `count_chunk`)."""
        increments: list[str | int | float] = ["chunks_done", 1, "chunks_dead_lettered", int(dead_lettered)]
        for outcome, count in outcomes.items():
            if outcome == "annotated":
                increments += ["annotated", count]
            else:
                increments += ["failed", count, FAILED_PREFIX + outcome, count]
        for name, value in (figures or {}).items():
            increments += [ACCOUNTING_PREFIX + name, value]
            if worker:
                increments += [f"{WORKER_PREFIX}{worker}|{name}", value]
        return increments

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

    @staticmethod
    def lane_key(queue: str, lane: Lane) -> str:
        """The producers waiting for room in one queue's lane: job id -> when its producer last asked."""
        return f"{PREFIX}:lane:{queue}:{lane.value}"

    def fair_turn(self, job_id: str, queue: str, lane: Lane, stale_after_s: float) -> bool:
        """Whether this job's producer may send its next chunk into its lane now: True when the job's
        chunks in flight (queued, not yet done) ÷ its share are the fewest of the lane's jobs whose
        producers are still sending, and among jobs tied at the fewest its last turn is the oldest
        (so tied producers alternate, whichever polls first). Registers the producer in the lane and
        records the turn it grants; one atomic script."""
        now = time.time()
        # the turns hash outlives a quiet lane by a few stale windows, then goes
        args: list[str | float] = [job_id, now, now - stale_after_s, f"{PREFIX}:job:", int(stale_after_s * 4) + 60]
        key = self.lane_key(queue, lane)
        return bool(self._fair_turn(keys=[key, f"{key}:turns"], args=args))

    def leave_lane(self, job_id: str, queue: str, lane: Lane) -> None:
        """This job's producer sends no more chunks: the lane's others stop waiting for it."""
        key = self.lane_key(queue, lane)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(key, job_id)
        pipe.hdel(f"{key}:turns", job_id)
        pipe.execute()

    @staticmethod
    def latency_key(kind: str, *, job_id: str | None = None, lane: Lane | None = None) -> str:
        """Where the newest samples of one latency kind are kept, for a job or for a lane."""
        owner = f"job:{job_id}" if job_id is not None else f"lane:{lane}"
        return f"{PREFIX}:{owner}:latency:{kind}"

    def add_latencies(self, job_id: str, lane: Lane, kind: str, seconds: list[float]) -> None:
        """Keep `seconds` (newest first, at most LATENCY_SAMPLES) for the job and for its lane; the
        job's samples expire after the job retention, the lane's a retention after the last sample."""
        if not seconds:
            return
        pipe = self.redis.pipeline(transaction=False)
        for key in (self.latency_key(kind, job_id=job_id), self.latency_key(kind, lane=lane)):
            pipe.lpush(key, *(f"{value:.4f}" for value in seconds))
            pipe.ltrim(key, 0, LATENCY_SAMPLES - 1)
            pipe.expire(key, self.retention_s)
        pipe.execute()

    def latencies(self, kind: str, *, job_id: str | None = None, lane: Lane | None = None) -> list[float]:
        """The newest samples of `kind` for a job or a lane, in seconds."""
        values: list[bytes | str] = self.redis.lrange(self.latency_key(kind, job_id=job_id, lane=lane), 0, -1)
        return [float(_text(value)) for value in values]

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

    def set_budget(self, job_id: str, budget: float) -> bool:
        """A running job's new cost cap (checked as each chunk is counted). False if it was not running."""

        def change(pipe: WatchingPipe) -> bool:
            if pipe.hget(self.key(job_id), "state") != JobState.RUNNING.value:
                return False
            pipe.multi()
            pipe.hset(self.key(job_id), "budget", budget)
            return True

        return self._transaction(change, self.key(job_id))

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
