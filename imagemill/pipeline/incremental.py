"""Incremental runs: skip images that already have an error-free record under the same signature.

Checked in bulk (one store query per batch of references), never one query per image.
"""

from collections.abc import Callable, Iterable, Iterator
from itertools import islice

from imagemill.core.schemas import ImageRef
from imagemill.core.stores import KeyedStore

CHECK_BATCH = 1000


def mark_existing(refs: Iterable[ImageRef], store: KeyedStore, signature: str) -> Iterator[tuple[ImageRef, bool]]:
    """Every ref in listing order, with True when the store holds a record for (uri, etag, signature)."""
    iterator = iter(refs)
    while batch := list(islice(iterator, CHECK_BATCH)):
        # without an etag a ref cannot be matched to a record version: it is always annotated
        keys = [(ref.uri, ref.etag, signature) for ref in batch if ref.etag]
        done = store.existing_keys(keys)
        for ref in batch:
            yield ref, bool(ref.etag) and (ref.uri, ref.etag, signature) in done


def skip_existing(
    refs: Iterable[ImageRef], store: KeyedStore, signature: str, on_skipped: Callable[[list[ImageRef]], None]
) -> Iterator[ImageRef]:
    """The refs without a record for (uri, etag, signature); `on_skipped(refs)` per batch, before
    that batch's fresh refs are yielded (local mode: nothing resumes from it, so order is free)."""
    iterator = iter(refs)
    while batch := list(islice(iterator, CHECK_BATCH)):
        marked = list(mark_existing(batch, store, signature))
        skipped = [ref for ref, done in marked if done]
        if skipped:
            on_skipped(skipped)
        yield from (ref for ref, done in marked if not done)
