"""Incremental runs: skip images that already have an error-free record under the same signature.

Checked in bulk (one store query per batch of references), never one query per image.
"""

from collections.abc import Callable, Iterable, Iterator
from itertools import islice

from imagemill.core.schemas import ImageRef
from imagemill.core.stores import KeyedStore

CHECK_BATCH = 1000


def skip_existing(
    refs: Iterable[ImageRef], store: KeyedStore, signature: str, on_skipped: Callable[[list[ImageRef]], None]
) -> Iterator[ImageRef]:
    """The refs without a record for (uri, etag, signature); `on_skipped(refs)` per batch."""
    iterator = iter(refs)
    while batch := list(islice(iterator, CHECK_BATCH)):
        # without an etag a ref cannot be matched to a record version: it is always annotated
        keys = [(ref.uri, ref.etag, signature) for ref in batch if ref.etag]
        done = store.existing_keys(keys)
        fresh = [ref for ref in batch if (ref.uri, ref.etag, signature) not in done]
        if len(fresh) < len(batch):
            on_skipped([ref for ref in batch if (ref.uri, ref.etag, signature) in done])
        yield from fresh
