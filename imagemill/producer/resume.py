"""Where a successor resumes a listing: past refs enqueued or skipped, in listing order, never past a
fresh ref that is not enqueued yet.

The incremental skip decides a whole batch of refs at once, and fresh refs wait in a partial chunk
until it fills, so skipped refs can lie after fresh refs that are not enqueued yet. A skipped ref
therefore counts, and moves the resume point, only once every fresh ref listed before it is
enqueued. The resume point is one uri (a successor lists again and starts after it), so it cannot
jump over a fresh ref that waits; what keeps a long unchanged stretch after one changed object cheap:

- Skipped refs are held as runs (fresh refs listed before the run, how many, the last uri), not as
  refs: the held state is one run per fresh ref that waits (a chunk's worth at most), however many
  refs are skipped behind them.
- Once `CUT_AFTER` skipped refs wait behind a pending fresh ref, `fresh` yields `CUT` and the
  partial chunk is sent at once (`imagemill.producer.chunking.chunks`): the refs behind it count and
  the resume point passes them. So the skipped count and the resume point move at least every
  `CUT_AFTER` skipped refs (plus up to a chunk of fresh ones): `status` shows a long scan moving, and
  a producer that dies mid-scan is resumed near where it stopped instead of at the changed object.
  The price is a shorter chunk where changed objects are sparse: at most one per `CUT_AFTER` skipped
  refs, against a chunk that would otherwise wait through an unbounded stretch.
"""

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from imagemill.core.schemas import ImageRef
from imagemill.producer.chunking import CUT, Cut

FLUSH_EVERY = 1000  # skipped refs counted (and the resume point moved) at least this often in a skipped run
CUT_AFTER = 4000  # skipped refs waiting behind a pending fresh ref that make its partial chunk go


@dataclass(slots=True)
class SkippedRun:
    """Consecutive skipped refs, all listed after the same number of fresh refs."""

    fresh_before: int
    count: int
    last_uri: str


@dataclass
class ResumePoint:
    """Tracks fresh refs listed and enqueued, and the runs of skipped refs between them."""

    fresh_listed: int = 0
    fresh_enqueued: int = 0
    held: deque[SkippedRun] = field(default_factory=deque)  # not counted yet, in listing order
    held_count: int = 0  # skipped refs in `held`
    cut_at: int = CUT_AFTER  # `held_count` at which the pending partial chunk is asked to go

    def fresh(
        self, marked: Iterable[tuple[ImageRef, bool]], flush: Callable[[int, str], None]
    ) -> Iterator[ImageRef | Cut]:
        """The fresh refs of `marked` (ref, already done), with a `CUT` where the pending chunk should go
        so that the skipped refs behind it can count; skipped refs are held, and handed to
        `flush(count, last_uri)` as soon as moving past them is safe while no fresh ref is pending."""
        for ref, done in marked:
            if not done:
                if self.idle and self.held:
                    self._flush(flush)
                self.fresh_listed += 1
                yield ref
                continue
            self._hold(ref.uri)
            if self.idle:
                if self.held_count >= FLUSH_EVERY:
                    self._flush(flush)
            elif self.held_count >= self.cut_at:
                # asked again only CUT_AFTER refs later if the chunk did not go (its consumer stopped)
                self.cut_at = self.held_count + CUT_AFTER
                yield CUT

    @property
    def idle(self) -> bool:
        """Every fresh ref listed so far is enqueued."""
        return self.fresh_listed == self.fresh_enqueued

    def enqueued(self, count: int) -> tuple[int, str | None]:
        """`count` more fresh refs are enqueued; returns `settle()`."""
        self.fresh_enqueued += count
        return self.settle()

    def settle(self) -> tuple[int, str | None]:
        """The held skipped refs it is now safe to move past: how many, and the uri of the last one
        when it lies after every enqueued ref (else the last enqueued ref is the resume point)."""
        count, last = 0, None
        while self.held and self.held[0].fresh_before <= self.fresh_enqueued:
            last = self.held.popleft()
            count += last.count
        if last is None:
            return 0, None
        self.held_count -= count
        if not self.held:
            self.cut_at = CUT_AFTER
        return count, last.last_uri if last.fresh_before == self.fresh_enqueued else None

    def _hold(self, uri: str) -> None:
        tail = self.held[-1] if self.held else None
        if tail is not None and tail.fresh_before == self.fresh_listed:
            tail.count += 1
            tail.last_uri = uri
        else:
            self.held.append(SkippedRun(self.fresh_listed, 1, uri))
        self.held_count += 1

    def _flush(self, flush: Callable[[int, str], None]) -> None:
        count, last = self.settle()
        if count and last is not None:
            flush(count, last)
