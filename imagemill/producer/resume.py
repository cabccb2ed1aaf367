"""Where a successor resumes a listing: past refs enqueued or skipped, in listing order, never past a
fresh ref that is not enqueued yet.

The incremental skip decides a whole batch of refs at once, so a batch's skipped refs can lie after
fresh refs of the same batch that still wait for room in the queue. A skipped ref is therefore held
until every fresh ref listed before it is enqueued; only then does it count, and move the resume point.
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from imagemill.core.schemas import ImageRef

FLUSH_EVERY = 1000  # skipped refs counted (and the resume point moved) at least this often in a skipped run


@dataclass
class ResumePoint:
    """Tracks fresh refs listed and enqueued, and the skipped refs between them."""

    fresh_listed: int = 0
    fresh_enqueued: int = 0
    # skipped refs not counted yet, each with how many fresh refs were listed before it
    held: list[tuple[int, ImageRef]] = field(default_factory=list)

    def fresh(self, marked: Iterable[tuple[ImageRef, bool]], flush: Callable[[int, str], None]) -> Iterator[ImageRef]:
        """The fresh refs of `marked` (ref, already done); skipped refs are held, and handed to
        `flush(count, last_uri)` as soon as moving past them is safe while no fresh ref is pending."""
        for ref, done in marked:
            if done:
                self.held.append((self.fresh_listed, ref))
                if self.idle and len(self.held) >= FLUSH_EVERY:
                    self._flush(flush)
                continue
            if self.idle and self.held:
                self._flush(flush)
            self.fresh_listed += 1
            yield ref

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
        safe = 0
        while safe < len(self.held) and self.held[safe][0] <= self.fresh_enqueued:
            safe += 1
        if not safe:
            return 0, None
        seen, last = self.held[safe - 1]
        del self.held[:safe]
        return safe, last.uri if seen == self.fresh_enqueued else None

    def _flush(self, flush: Callable[[int, str], None]) -> None:
        count, last = self.settle()
        if count and last is not None:
            flush(count, last)
