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
from imagemill.core.connections import redis_client
from imagemill.core.credentials import with_own_credentials, without_credentials
from imagemill.core.errors import UserError
from imagemill.core.jobs import Job, JobRegistry, JobState, new_job_id
from imagemill.core.pipeline_key import pipeline_key
from imagemill.core.schemas import ChunkMessage, ImageRef, Task
from imagemill.core.settings import Settings
from imagemill.core.stores import KeyedStore, MarksDeleted, PrefixListing, open_writer
from imagemill.core.stores.s3tags import SCHEME as S3TAGS_SCHEME
from imagemill.pipeline.incremental import mark_existing
from imagemill.pipeline.sources import PrefixSource, RefListSource, S3Source, Source
from imagemill.producer.backpressure import Backpressure
from imagemill.producer.chunking import chunks
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
    # the resume point only moves past refs enqueued or skipped, in listing order
    _resume: ResumePoint = field(default_factory=ResumePoint, init=False, repr=False)

    def __post_init__(self) -> None:
        check_source_fits_sink(self.source, self.sink)
        # a retry or a scheduled scan has the sink as stored, without its password: add ours
        self.sink_url = with_own_credentials(self.sink, self.settings.sink)
        self.queue = queue_for(self.tasks, self.settings)
        self.celery: Celery = make_celery(self.settings)
        self.backpressure = Backpressure(
            redis_client(self.settings.broker_url), self.queue, self.settings.queue_high_water
        )

    def close(self) -> None:
        """Close the queue-depth client and release the Celery app."""
        # the broker connections that sent chunks stay in kombu's process-wide pool, shared by every
        # app on this broker (the next submission in a beat worker reuses them): not ours to close
        self.celery.close()
        self.backpressure.client.close()

    def register(self) -> tuple[Job, bool]:
        """Create the job, or attach to the running one with the same key. True when created."""
        key = job_key(str(self.source), self.sink, self.tasks, self.settings)
        job, created = self.registry.create(
            self.job_id, str(self.source), self.tasks, self.sink, self.queue, idempotency_key=key
        )
        self.job_id = job.id
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
            self._skipped(*self._resume.settle())  # skipped refs after the last chunk
            self._mark_unlisted(seen)
        self.registry.end_listing(self.job_id, self.first_seq + count)
        return count

    def _prefix_listing(self, listing: ExitStack) -> PrefixListing | None:
        """The sink following this listing, to mark what it no longer holds once it completes; None
        for a manifest (it does not say what was deleted), a resumed listing (its start was another
        producer's) or a sink that keeps only history. Opened into `listing`, closed with it."""
        if self.resume_after is not None or not isinstance(self.source, PrefixSource):
            return None
        store = listing.enter_context(open_writer(self.sink_url))
        if not isinstance(store, MarksDeleted):
            return None
        return listing.enter_context(store.listing(self.source.uri_prefix))

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

    def _incremental(self, refs: Iterable[ImageRef], listing: ExitStack) -> Iterable[ImageRef]:
        """Skip what the sink holds for the signature the workers published for this pipeline;
        the sink is opened into `listing`, which closes it when the listing ends."""
        if self.force:
            return refs
        signature = self.registry.signature_for(pipeline_key(self.tasks, self.settings))
        store = listing.enter_context(open_writer(self.sink_url))
        if signature is None or not isinstance(store, KeyedStore):
            reason = "no worker has run this pipeline yet" if signature is None else "the sink cannot be searched"
            log.info("job %s annotates everything: %s", self.job_id, reason)
            return refs

        # skipped refs are counted, and moved past, only once the fresh refs listed before them are enqueued
        return self._resume.fresh(mark_existing(refs, store, signature), self._skipped)

    def _skipped(self, count: int, last_uri: str | None) -> None:
        if count:
            self.registry.add_queued(self.job_id, listed=count, queued=0, skipped=count, last_uri=last_uri)

    def _enqueue(self, chunk: ChunkMessage) -> None:
        self.celery.send_task(CHUNK_TASK, args=[chunk.model_dump(mode="json")], queue=self.queue)
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
