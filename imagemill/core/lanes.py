"""Priority lanes: urgent, normal and backfill, and the kombu priority each lane's chunks are sent with.

A lane is a priority step of the Redis transport (`core.broker`): a worker's BRPOP names every
urgent list before any normal one, and every normal one before any backfill one (ARCHITECTURE.md).
"""

from enum import StrEnum

from imagemill.core.errors import UserError


class Lane(StrEnum):
    """Where a job's chunks wait; a worker takes the next chunk from the highest lane that has one."""

    URGENT = "urgent"
    NORMAL = "normal"
    BACKFILL = "backfill"

    @property
    def priority(self) -> int:
        """The message priority sent with the lane's chunks: one of kombu's Redis priority steps,
        where 0 is served first (its list is the queue's own; the others are suffixed)."""
        return LANE_PRIORITIES[self]


# kombu's Redis transport rounds a priority down to one of its steps (0, 3, 6, 9) and keeps a list per
# step: the queue's own for 0, `<queue>\x06\x16<step>` for the others
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITIES = (0, 3, 6, 9)
LANE_PRIORITIES: dict[Lane, int] = {Lane.URGENT: 0, Lane.NORMAL: 3, Lane.BACKFILL: 6}
DEFAULT_LANE = Lane.NORMAL
LANE_NAMES = "|".join(lane.value for lane in Lane)


def parse_lane(value: str) -> Lane:
    """The lane named `value` (any case); UserError, one line, for another name."""
    try:
        return Lane(value.strip().lower())
    except ValueError:
        raise UserError(f"priority {value!r}: expected one of {LANE_NAMES}") from None


def priority_list(queue: str, priority: int) -> str:
    """The Redis list kombu keeps for `queue`'s messages of a priority step."""
    return queue if priority == 0 else f"{queue}{KOMBU_PRIORITY_SEP}{priority}"


def lane_list(queue: str, lane: Lane) -> str:
    """The Redis list where `queue`'s chunks of `lane` wait (what KEDA and backpressure count)."""
    return priority_list(queue, lane.priority)
