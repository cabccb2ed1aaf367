"""Incremental skip in process: which refs a store's records let a run skip, asked in bulk, in order.

The fast specification of `imagemill.pipeline.sources.incremental` (the end-to-end runs are in
tests/test_incremental.py); `python -m tools.mutation` runs it against that module's mutants.
"""

from collections.abc import Iterable

from imagemill.core.schemas import ImageRef
from imagemill.pipeline.sources import incremental
from imagemill.pipeline.sources.incremental import mark_existing, skip_existing

Key = tuple[str, str | None, str]


class Store:
    """A KeyedSink holding these keys; it remembers every bulk question it was asked."""

    def __init__(self, keys: set[Key]) -> None:
        self.keys = keys
        self.asked: list[list[Key]] = []

    def existing_keys(self, keys: Iterable[Key]) -> set[Key]:
        asked = list(keys)
        self.asked.append(asked)
        return {key for key in asked if key in self.keys}


def refs(*names: str, etag: str | None = "e") -> list[ImageRef]:
    return [ImageRef(uri=f"s3://b/{name}", etag=etag) for name in names]


def test_only_a_record_with_the_same_uri_etag_and_signature_is_skipped() -> None:
    store = Store({("s3://b/done", "e", "sig"), ("s3://b/other-version", "old", "sig"), ("s3://b/other-sig", "e", "x")})
    listed = [*refs("done", "new", "other-version", "other-sig"), *refs("done", etag=None)]
    marked = [(ref.uri, ref.etag, done) for ref, done in mark_existing(listed, store, "sig")]
    assert marked == [
        ("s3://b/done", "e", True),
        ("s3://b/new", "e", False),
        ("s3://b/other-version", "e", False),
        ("s3://b/other-sig", "e", False),
        ("s3://b/done", None, False),  # no etag: no version to match, always annotated
    ]
    assert store.asked == [[(r.uri, r.etag, "sig") for r in listed if r.etag]]  # one question, no etag-less key


def test_skipping_asks_in_batches_and_reports_each_batchs_skipped_before_its_fresh_refs(monkeypatch) -> None:
    monkeypatch.setattr(incremental, "CHECK_BATCH", 2)
    store = Store({("s3://b/a", "e", "sig"), ("s3://b/d", "e", "sig")})
    events: list[str] = []

    def skipped(batch: list[ImageRef]) -> None:
        events.append("skipped " + ",".join(ref.uri[-1] for ref in batch))

    for ref in skip_existing(refs("a", "b", "c", "d", "e"), store, "sig", skipped):
        events.append("fresh " + ref.uri[-1])
    assert events == ["skipped a", "fresh b", "skipped d", "fresh c", "fresh e"]
    assert [len(question) for question in store.asked] == [2, 2, 1]
    assert list(skip_existing([], store, "sig", skipped)) == []
