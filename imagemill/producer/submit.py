"""Submitting a job: register it, list the source, enqueue chunks under backpressure, finish.

Runs in the `imagemill submit` process; workers anywhere pick the chunks up from Redis. The same
source, sink and pipeline submitted again while its job runs attaches to that job instead of
doubling the work; a producer that died is taken over and resumed after its last chunk.
"""

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

from celery import Celery

from imagemill.core.broker import CHUNK_TASK, make_celery, queue_for
from imagemill.core.closing import Closing
from imagemill.core.credentials import with_own_credentials, without_credentials
from imagemill.core.errors import ErrorKind, UserError
from imagemill.core.jobs import Job, JobRegistry, JobState, new_job_id
from imagemill.core.lanes import DEFAULT_LANE, Lane
from imagemill.core.pipeline_key import pipeline_key
from imagemill.core.redaction import redact_url
from imagemill.core.schemas import ChunkMessage, ImageRef
from imagemill.core.settings import Settings
from imagemill.core.sinks import KeyedSink, MarksDeleted, PrefixListing, SearchableSink, open_sink
from imagemill.core.sinks.s3tags import SCHEME as S3TAGS_SCHEME
from imagemill.core.tasks import Task
from imagemill.pipeline.sources import PrefixSource, RefListSource, S3Source, Source, open_source
from imagemill.pipeline.sources.incremental import mark_existing
from imagemill.pipeline.sources.manifests import check as check_manifest
from imagemill.producer.backpressure import Backpressure
from imagemill.producer.chunking import Cut, chunks
from imagemill.producer.resume import ResumePoint

log = logging.getLogger(__name__)


def job_key(source: str, sink: str, tasks: tuple[Task, ...], settings: Settings) -> str:
    """The idempotency key of a job: what is annotated, by which models, and where it goes."""
    spec = {"source": source, "sink": without_credentials(sink), "pipeline": pipeline_key(tasks, settings)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Submission(Closing):
    """One job being enqueued; `register` then `run` lists and enqueues everything.

    A context manager: `with` closes its broker connections (the registry is the caller's to close)."""

    source: Source
    tasks: tuple[Task, ...]
    sink: str
    settings: Settings
    registry: JobRegistry
    job_id: str = field(default_factory=new_job_id)
    on_chunk: Callable[[ChunkMessage], None] = lambda chunk: None
    producing: bool = True  # False when attached to a job another live producer is listing
    resume_after: str | None = None
    first_seq: int = 0
    force: bool = False  # annotate again even what the sink already holds
    lane: Lane = DEFAULT_LANE  # a job attached to keeps its own
    share: int = 1  # the job's weight in its lane's fair share
    budget: float | None = None  # the job's cost cap (IMAGEMILL_COST_PER_HOUR of its workers)
    continues: Job | None = None  # the job (over its budget) this one goes on from
    # the resume point only moves past refs enqueued or skipped, in listing order
    _resume: ResumePoint = field(default_factory=ResumePoint, init=False, repr=False)

    def __post_init__(self) -> None:
        check_source_fits_sink(self.source, self.sink)
        # a retry or a scheduled scan has the sink as stored, without its password: add ours
        self.sink_url = with_own_credentials(self.sink, self.settings.sink)
        self.queue = queue_for(self.tasks, self.settings)
        self.lane = Lane(self.lane)  # a lane's name will do (`urgent`)
        if self.share < 1:
            raise UserError(f"share {self.share}: a job's share is a whole number of at least 1")
        self.celery: Celery = make_celery(self.settings)
        self.backpressure = Backpressure.on_broker(self.settings, self.queue, self.lane, self._turn)

    def close(self) -> None:
        """Close the queue-depth client and release the Celery app."""
        # the broker connections that sent chunks stay in kombu's process-wide pool, shared by every
        # app on this broker (the next submission in a beat worker reuses them): not ours to close
        self.celery.close()
        self.backpressure.client.close()

    def register(self) -> tuple[Job, bool]:
        """Create the job, or attach to the running one with the same key. True when created."""
        key = job_key(str(self.source), self.sink, self.tasks, self.settings)
        before = self.continues
        job, created = self.registry.create(
            self.job_id,
            str(self.source),
            self.tasks,
            self.sink,
            self.queue,
            idempotency_key=key,
            lane=self.lane,
            share=self.share,
            budget=self.budget,
            continues=before.id if before else None,
            spent_before=before.spent_before + (before.cost or 0.0) if before else 0.0,
        )
        self.job_id = job.id
        # attached to a running job (or taking it over): its chunks go on in its own lane
        self.lane = self.backpressure.lane = job.lane
        self.producing = created or self._take_over()
        return job, created

    def _take_over(self) -> bool:
        """Become the producer if the job's own went silent; resume after its last chunk."""
        if not self.registry.take_over(self.job_id, self.settings.producer_stale_s):
            return False
        job = self._job()
        log.warning("job %s lost its producer; resuming after %s", job.id, job.resume_after)
        self.resume_after, self.first_seq = job.resume_after, job.chunks_queued
        return True

    def _job(self) -> Job:
        job = self.registry.get(self.job_id)
        if job is None:  # registered by `register`; only a flushed Redis loses it
            raise UserError(f"job {self.job_id} is gone from the job registry")
        return job

    def run(self, standby: bool = False) -> int:
        """Enqueue every chunk not enqueued yet; returns how many. Stops early if the job ends.

        With `standby`, a submission attached to a job another producer is listing waits, and
        takes over if that producer dies before the listing ends."""
        while not self.producing:
            job = self._job()
            if not standby or job.listing_done or job.state != JobState.RUNNING:
                return 0
            time.sleep(min(1.0, self.settings.producer_stale_s / 2))
            self.producing = self._take_over()
        count = 0
        self._resume = ResumePoint()
        # the sink searched for what to skip stays open while the listing runs, and no longer
        with ExitStack() as listing:
            seen = self._prefix_listing(listing)
            listed = _after(self.source.refs, self.resume_after)
            refs = self._incremental(seen.record(listed) if seen else listed, listing)
            try:
                for chunk in chunks(self.job_id, self.tasks, refs, self.settings.chunk_size, self.first_seq):
                    if not self.backpressure.wait_for_room(self._alive) or not self._alive():
                        log.info("job %s is no longer running; stopped enqueueing", self.job_id)
                        break
                    self._enqueue(chunk)
                    count += 1
            except UserError as exc:
                self.registry.fail(self.job_id, str(exc))
                raise
            finally:
                self.registry.leave_lane(self.job_id, self.queue, self.lane)
            self._skipped(*self._resume.settle())  # skipped refs after the last chunk
            self._mark_unlisted(seen)
        self.registry.end_listing(self.job_id, self.first_seq + count)
        return count

    def _turn(self) -> bool:
        """Whether this job may send its next chunk: its turn in its lane's fair share."""
        return self.registry.fair_turn(self.job_id, self.queue, self.lane, self.settings.producer_stale_s)

    def _prefix_listing(self, listing: ExitStack) -> PrefixListing | None:
        """The sink following this listing, to mark what it no longer holds once it completes; None
        for a manifest (it does not say what was deleted), a resumed listing (its start was another
        producer's) or a sink that keeps only history. Opened into `listing`, closed with it."""
        if self.resume_after is not None or not isinstance(self.source, PrefixSource):
            return None
        sink = listing.enter_context(open_sink(self.sink_url))
        if not isinstance(sink, MarksDeleted):
            return None
        return listing.enter_context(sink.listing(self.source.uri_prefix))

    def _mark_unlisted(self, seen: PrefixListing | None) -> None:
        """Before `end_listing`, so that a job is done only once its sink says what is current."""
        if seen is None or not seen.complete:
            return
        self.registry.heartbeat(self.job_id)
        try:
            marks = seen.finish()
        except Exception:  # the job's chunks are all enqueued: fail nothing, the next complete scan marks
            log.exception("job %s: marking deleted and replaced objects failed", self.job_id)
            return
        log.info("job %s: listing of %s complete: %s", self.job_id, self.source, marks)

    def _incremental(self, refs: Iterable[ImageRef], listing: ExitStack) -> Iterable[ImageRef | Cut]:
        """Skip what the sink holds for the signature the workers published for this pipeline, with a
        `Cut` where a partial chunk should go so that the skipped refs behind it count (`ResumePoint`);
        the sink is opened into `listing`, which closes it when the listing ends."""
        if self.force:
            return refs
        signature = self.registry.signature_for(pipeline_key(self.tasks, self.settings))
        sink = listing.enter_context(open_sink(self.sink_url))
        if signature is None or not isinstance(sink, KeyedSink):
            reason = "no worker has run this pipeline yet" if signature is None else "the sink cannot be searched"
            log.info("job %s annotates everything: %s", self.job_id, reason)
            return refs

        # skipped refs are counted, and moved past, only once the fresh refs listed before them are enqueued;
        # a long skipped stretch behind a pending fresh ref cuts its chunk short rather than wait
        return self._resume.fresh(mark_existing(refs, sink, signature), self._skipped)

    def _skipped(self, count: int, last_uri: str | None) -> None:
        if count:
            self.registry.add_queued(self.job_id, listed=count, queued=0, skipped=count, last_uri=last_uri)

    def _enqueue(self, chunk: ChunkMessage) -> None:
        chunk = chunk.model_copy(update={"lane": self.lane, "enqueued_at": time.time()})
        message = chunk.model_dump(mode="json")
        self.celery.send_task(CHUNK_TASK, args=[message], queue=self.queue, priority=self.lane.priority)
        n = len(chunk.refs)
        # skipped refs listed before this chunk's last ref (or after it, when no fresh ref follows) count now
        skipped, after = self._resume.enqueued(n)
        last_uri = after or chunk.refs[-1].uri
        self.registry.add_queued(self.job_id, listed=n + skipped, queued=n, skipped=skipped, last_uri=last_uri)
        self.on_chunk(chunk)

    def _alive(self) -> bool:
        """Heartbeat, and whether the job still wants chunks."""
        self.registry.heartbeat(self.job_id)
        return self.registry.state(self.job_id) == JobState.RUNNING


def check_source_fits_sink(source: Source, sink: str) -> None:
    """UserError before anything is registered or enqueued when the sink could write none of the
    source's records: s3tags:// tags S3 objects, and a folder or a manifest names files."""
    if sink.startswith(S3TAGS_SCHEME) and not isinstance(source, S3Source | RefListSource):
        raise UserError(
            f"sink {S3TAGS_SCHEME} tags each image's own S3 object, so it needs an s3://bucket/prefix SOURCE,"
            f" not {source}: use --sink postgresql://…, s3://bucket/prefix/ or file:///dir/ for it"
        )


def checked_source(source_spec: str, sink: str, settings: Settings, *, strict: bool = False) -> Source:
    """The source of a submit, once everything that can be checked before a job exists is: a sink
    workers share and can reach, a source the sink can write, with `strict` a manifest read through.
    UserError, one line, for the first that fails; nothing is registered or enqueued before."""
    _check_shared(sink)
    source = open_source(source_spec, settings)
    check_source_fits_sink(source, sink)  # before any service is asked anything
    if strict:
        check_manifest(source)  # the whole manifest read before the job exists
    _check_reachable(sink)
    return source


def checked_sink(sink: str) -> None:
    """UserError, one line, unless `sink` is one workers share and can reach (a watch's sink)."""
    _check_shared(sink)
    _check_reachable(sink)


def _check_shared(sink: str) -> None:
    if "://" not in sink:
        raise UserError(
            f"sink {sink}: workers need a shared sink: postgresql://…, s3://bucket/prefix/ or file:///shared/dir/"
        )


def _check_reachable(sink: str) -> None:
    with open_sink(sink) as opened:
        opened.check()  # a bad or unreachable sink fails here, before anything is queued


def failed_refs(job: Job, settings: Settings, kinds: set[str]) -> tuple[ImageRef, ...]:
    """The images of `job` whose records carry an error (of `kinds`, when given), to submit again:
    not a bad manifest line, which names no image to fetch again (the manifest needs fixing)."""
    with open_sink(with_own_credentials(job.sink, settings.sink)) as sink:
        if not isinstance(sink, SearchableSink):
            raise UserError(f"the sink {redact_url(job.sink)} cannot be searched for failed records")
        failed = [r for r in sink.failed_records(job.id) if r.error and (not kinds or r.error.kind in kinds)]
    failed = [r for r in failed if r.error and r.error.kind != ErrorKind.BAD_REFERENCE]
    return tuple(ImageRef(uri=r.uri, etag=r.etag) for r in failed)


def _after(list_refs: Callable[[], Iterable[ImageRef]], resume_after: str | None) -> Iterator[ImageRef]:
    """The refs listed after `resume_after` (listings are in a stable order).

    If that ref has vanished from the listing, everything is enqueued again: redelivered images
    rewrite their own records, so doing work twice is the price of never losing any."""
    if resume_after is None:
        yield from list_refs()
        return
    iterator = iter(list_refs())
    for ref in iterator:
        if ref.uri == resume_after:
            yield from iterator
            return
    log.warning("resume point %s is gone from the listing; enqueueing the whole listing again", resume_after)
    yield from list_refs()
