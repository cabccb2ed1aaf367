"""Incremental runs: skip images that already have an error-free record under the same signature.

Checked in bulk (one sink query per batch of references), never one query per image.
"""

from collections.abc import Callable, Iterable, Iterator

from imagemill.core.batching import batched
from imagemill.core.schemas import ImageRef
from imagemill.core.sinks import KeyedSink

CHECK_BATCH = 1000


def mark_existing(refs: Iterable[ImageRef], sink: KeyedSink, signature: str) -> Iterator[tuple[ImageRef, bool]]:
    """Every ref in listing order, with True when the sink holds a record for (uri, etag, signature)."""
    for batch in batched(refs, CHECK_BATCH):
        # without an etag a ref cannot be matched to a record version: it is always annotated
        keys = [(ref.uri, ref.etag, signature) for ref in batch if ref.etag]
        done = sink.existing_keys(keys)
        for ref in batch:
            yield ref, bool(ref.etag) and (ref.uri, ref.etag, signature) in done


def skip_existing(
    refs: Iterable[ImageRef], sink: KeyedSink, signature: str, on_skipped: Callable[[list[ImageRef]], None]
) -> Iterator[ImageRef]:
    """The refs without a record for (uri, etag, signature); `on_skipped(refs)` per batch, before
    that batch's fresh refs are yielded (local mode: nothing resumes from it, so order is free)."""
    for batch in batched(refs, CHECK_BATCH):
        marked = list(mark_existing(batch, sink, signature))
        skipped = [ref for ref, done in marked if done]
        if skipped:
            on_skipped(skipped)
        yield from (ref for ref, done in marked if not done)
