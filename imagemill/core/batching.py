"""Batches: a stream cut into lists of at most `size`, in order, the last one shorter.

The one batching helper: model micro-batches, bulk key checks, chunks for engine processes, reads.
"""

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of at most `size` items, in order, drawn lazily (`itertools.batched` arrives in Python 3.12,
    and gives tuples)."""
    if size < 1:
        raise ValueError(f"a batch holds at least one item, not {size}")
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch
