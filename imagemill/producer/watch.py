"""Watching: upload events turned into chunks of one long-lived job, and removals into marks.

One job per watched event source, sink and pipeline, shared by every watcher of it and running
while they run (`imagemill status` counts it live); events are gathered for a second into chunks.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime

from celery import Celery

from imagemill.core.broker import CHUNK_TASK, make_celery, queue_for
from imagemill.core.closing import Closing
from imagemill.core.credentials import with_own_credentials
from imagemill.core.errors import UserError
from imagemill.core.jobs import Job, JobRegistry, JobState, new_job_id
from imagemill.core.lanes import Lane
from imagemill.core.pipeline_key import pipeline_key
from imagemill.core.schemas import ChunkMessage, ImageRef
from imagemill.core.settings import Settings
from imagemill.core.sinks import KeyedSink, ListingMarks, MarksDeleted, ObjectChange, Sink, open_sink
from imagemill.core.tasks import Task
from imagemill.producer.backpressure import Backpressure
from imagemill.producer.chunking import chunk_id
from imagemill.producer.events.s3_events import Change, ObjectEvent, latest_per_object, parse
from imagemill.producer.events.sqs import Message, SqsReceiver
from imagemill.producer.submit import job_key

log = logging.getLogger(__name__)

# uploads are what someone waits for: ahead of any backfill or scheduled scan
WATCH_LANE = Lane.URGENT


class WatchEnded(UserError):
    """The watch's job was cancelled or failed (`imagemill cancel`): the watcher stops."""

    exit_code = 1


@dataclass(frozen=True)
class Handled:
    """What one batch of events did: images enqueued and skipped (the sink holds their record),
    removals seen, and the marks they made (None: the sink keeps history only)."""

    enqueued: int = 0
    skipped: int = 0
    removed: int = 0
    marks: ListingMarks | None = None


@dataclass
class Watch(Closing):
    """The job a watcher feeds: `register` it, then `handle` each batch of events. A context manager
    that closes its sink, broker and Redis connections (the registry is the caller's)."""

    source: str  # the event source as given: sqs://QUEUE or http://HOST:PORT
    tasks: tuple[Task, ...]
    sink: str
    settings: Settings
    registry: JobRegistry
    lane: Lane = WATCH_LANE
    job_id: str = field(default_factory=new_job_id)

    def __post_init__(self) -> None:
        self.lane = Lane(self.lane)  # a lane's name will do (`urgent`)
        self.sink_url = with_own_credentials(self.sink, self.settings.sink)
        self.queue = queue_for(self.tasks, self.settings)
        self.celery: Celery = make_celery(self.settings)
        self.backpressure = Backpressure.on_broker(self.settings, self.queue, self.lane, self._turn)
        self._sink: Sink = open_sink(self.sink_url)
        self.marks_removals = isinstance(self._sink, MarksDeleted)

    def close(self) -> None:
        """Leave the lane's fair share (the job goes on: another watcher, or this one restarted, joins
        it), close the sink, the queue-depth client and the Celery app."""
        self.registry.leave_lane(self.job_id, self.queue, self.lane)
        self._sink.close()
        self.celery.close()
        self.backpressure.client.close()

    def register(self) -> tuple[Job, bool]:
        """Create the watch's job, or join the running one of another watcher of the same source,
        sink and pipeline (or of this watch before a restart). True when created."""
        key = job_key(self.source, self.sink, self.tasks, self.settings)
        job, created = self.registry.create(
            self.job_id, self.source, self.tasks, self.sink, self.queue, idempotency_key=key, lane=self.lane
        )
        self.job_id = job.id
        # joined a running job: its chunks go on in its own lane
        self.lane = self.backpressure.lane = job.lane
        return job, created

    def handle(self, events: Sequence[ObjectEvent]) -> Handled:
        """Mark what the events removed or replaced, and enqueue the created images the sink does not
        hold yet, in chunks of at most IMAGEMILL_WATCH_BATCH_IMAGES. Returns once all is enqueued;
        raises (nothing acknowledged) when something fails, WatchEnded when the job no longer runs."""
        self._check_running()
        latest = latest_per_object(list(events))
        created = [event for event in latest if event.change == Change.CREATED]
        removed = [event for event in latest if event.change == Change.REMOVED]
        marks = None
        if isinstance(self._sink, MarksDeleted):
            marks = self._sink.mark_events(_changes(created), _changes(removed))
        fresh, skipped = self._fresh(created)
        size = min(self.settings.watch_batch_images, self.settings.chunk_size)
        for start in range(0, len(fresh), size):
            batch = fresh[start : start + size]
            if not self.backpressure.wait_for_room(self._alive):
                raise WatchEnded(f"job {self.job_id} is no longer running; the watch stops")
            self._enqueue([event.ref for event in batch], [event.event_time for event in batch])
        if skipped:
            self.registry.add_queued(self.job_id, listed=skipped, queued=0, skipped=skipped)
        self.registry.heartbeat(self.job_id)
        return Handled(enqueued=len(fresh), skipped=skipped, removed=len(removed), marks=marks)

    def _fresh(self, created: list[ObjectEvent]) -> tuple[list[ObjectEvent], int]:
        """The created objects the sink holds no error-free record of for this pipeline (a redelivered
        event, an upload of the same bytes again), and how many it does hold."""
        signature = self.registry.signature_for(pipeline_key(self.tasks, self.settings))
        if signature is None or not isinstance(self._sink, KeyedSink) or not created:
            return created, 0
        done = self._sink.existing_keys((event.uri, event.etag, signature) for event in created if event.etag)
        fresh = [event for event in created if (event.uri, event.etag, signature) not in done]
        return fresh, len(created) - len(fresh)

    def _enqueue(self, refs: list[ImageRef], event_times: list[float]) -> None:
        """Send one chunk of created objects in the watch's lane, each ref with its upload's time
        (the worker measures upload-to-record from it), numbered apart from every other watcher's
        chunks of this job."""
        seq = self.registry.reserve_chunks(self.job_id)
        if seq is None:
            raise WatchEnded(f"job {self.job_id} is gone from the job registry; the watch stops")
        timed = [ref.model_copy(update={"event_time": at}) for ref, at in zip(refs, event_times, strict=True)]
        chunk = ChunkMessage(
            job_id=self.job_id,
            chunk_id=chunk_id(self.job_id, seq),
            tasks=self.tasks,
            refs=timed,
            lane=self.lane,
            enqueued_at=time.time(),
        )
        message = chunk.model_dump(mode="json")
        self.celery.send_task(CHUNK_TASK, args=[message], queue=self.queue, priority=self.lane.priority)
        self.registry.add_queued(self.job_id, listed=len(refs), queued=len(refs), last_uri=refs[-1].uri)

    def _turn(self) -> bool:
        """Whether this job may send its next chunk: its turn among the lane's jobs (fair share)."""
        return self.registry.fair_turn(self.job_id, self.queue, self.lane, self.settings.producer_stale_s)

    def _check_running(self) -> None:
        state = self.registry.state(self.job_id)
        if state != JobState.RUNNING:
            raise WatchEnded(f"job {self.job_id} is {state or 'gone'}; the watch stops")

    def _alive(self) -> bool:
        """Heartbeat, and whether the job still wants chunks (while waiting for room in the queue)."""
        self.registry.heartbeat(self.job_id)
        return self.registry.state(self.job_id) == JobState.RUNNING


def _changes(events: list[ObjectEvent]) -> list[ObjectChange]:
    return [(event.uri, event.etag or "", datetime.fromtimestamp(event.event_time, UTC)) for event in events]


@dataclass
class _Pending:
    events: list[ObjectEvent]
    done: "Future[Handled]"


class Batcher:
    """Gathers the events of concurrent deliveries (webhook requests) for up to `window_s`, or until
    `max_events`, and hands each gathering to `handle` on one thread (the sink's connection is not
    for sharing); each delivery's future resolves once its events are enqueued, or fails with them."""

    def __init__(self, handle: Callable[[list[ObjectEvent]], Handled], window_s: float, max_events: int) -> None:
        self._handle = handle
        self._window_s = window_s
        self._max_events = max_events
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imagemill-watch-batcher", daemon=True)

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Handle what was delivered, then stop."""
        self._stop.set()
        self._thread.join(timeout)

    def submit(self, events: list[ObjectEvent]) -> "Future[Handled]":
        pending = _Pending(events, Future())
        if not events:
            pending.done.set_result(Handled())
        elif self._stop.is_set():
            pending.done.set_exception(RuntimeError("the watcher is stopping"))
        else:
            self._queue.put(pending)
        return pending.done

    def _run(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            gathered = [first]
            count = len(first.events)
            deadline = time.monotonic() + self._window_s
            while count < self._max_events and (left := deadline - time.monotonic()) > 0:
                try:
                    more = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                gathered.append(more)
                count += len(more.events)
            self._deliver(gathered)

    def _deliver(self, gathered: list[_Pending]) -> None:
        try:
            handled = self._handle([event for pending in gathered for event in pending.events])
        except BaseException as exc:  # noqa: BLE001 - each delivery's sender answers with it
            for pending in gathered:
                pending.done.set_exception(exc)
            return
        for pending in gathered:
            pending.done.set_result(handled)


def follow_queue(watch: Watch, receiver: SqsReceiver, stop: threading.Event) -> None:
    """Receive from SQS until `stop`: a batch is the first messages a long poll brings and whatever
    else is waiting, polled until a poll comes back empty, IMAGEMILL_WATCH_BATCH_S have passed or
    IMAGEMILL_WATCH_BATCH_IMAGES events are in; its events are handled, and only then its messages
    deleted. A batch that fails is left in the queue and comes back after the visibility timeout; a
    message that is not an S3 event is deleted with a warning (it never will be one). WatchEnded
    ends the watch."""
    while not stop.is_set():
        messages = receiver.receive()
        if not messages:
            continue
        events, unreadable = _read(messages)
        deadline = time.monotonic() + watch.settings.watch_batch_s
        # latency first: what is waiting joins the batch, which closes at the first empty poll (a
        # steady stream fills it up to the window or the size; a lone upload goes at once)
        while len(events) < watch.settings.watch_batch_images and time.monotonic() < deadline:
            more = receiver.receive(wait_s=0)
            if not more:
                break
            more_events, more_unreadable = _read(more)
            messages += more
            events += more_events
            unreadable += more_unreadable
        try:
            handled = watch.handle(events)
        except WatchEnded:
            raise
        except Exception:
            log.exception(
                "could not enqueue %d events of %d messages; SQS delivers them again", len(events), len(messages)
            )
            stop.wait(1.0)
            continue
        receiver.delete(messages)
        log.info(
            "%d messages: %d images enqueued, %d already annotated, %d removed, %d messages unreadable",
            len(messages),
            handled.enqueued,
            handled.skipped,
            handled.removed,
            unreadable,
        )


def _read(messages: list[Message]) -> tuple[list[ObjectEvent], int]:
    """The object events of SQS messages, and how many messages were not S3 events (logged)."""
    events: list[ObjectEvent] = []
    unreadable = 0
    for message in messages:
        try:
            events += parse(message.get("Body", "")).events
        except ValueError as exc:
            log.warning("deleting SQS message %s, which is not an S3 event: %s", message.get("MessageId"), exc)
            unreadable += 1
    return events, unreadable


def serve_webhook(watch: Watch, host: str, port: int, secret: str) -> None:
    """Receive events over HTTP on host:port until SIGINT/SIGTERM; WatchEnded ends it too."""
    import uvicorn  # only a watcher with an HTTP receiver loads uvicorn

    from imagemill.producer.events.webhook import webhook_app  # and Starlette, for the same reason

    ended: list[WatchEnded] = []

    def handle(events: list[ObjectEvent]) -> Handled:
        try:
            return watch.handle(events)
        except WatchEnded as exc:
            ended.append(exc)
            server.should_exit = True
            raise

    batcher = Batcher(handle, watch.settings.watch_batch_s, watch.settings.watch_batch_images).start()
    config = uvicorn.Config(webhook_app(batcher.submit, secret), host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        batcher.stop()
    if ended:
        raise ended[0]
