"""The resume point of a listing moves only past refs enqueued or skipped, in listing order."""

from collections.abc import Iterator
from itertools import chain

import pytest

from imagemill.core.schemas import ImageRef
from imagemill.core.tasks import Task
from imagemill.producer.chunking import CUT, chunks
from imagemill.producer.resume import CUT_AFTER, ResumePoint


def ref(name: str) -> ImageRef:
    return ImageRef(uri=f"s3://b/{name}", etag="e")


def test_skipped_refs_after_a_pending_fresh_ref_wait_for_its_chunk() -> None:
    names = ["0f", "1s", "2f", "3s", "4s", "5f", "6s"]  # in listing order; f: fresh, s: the sink holds it
    marked = [(ref(n), n.endswith("s")) for n in names]
    point, flushed, resume = ResumePoint(), [], []
    fresh = point.fresh(marked, lambda count, last: flushed.append((count, last)))
    for chunk in chunks("job", (Task.CAPTION,), fresh, 2):
        # the producer may die here, before the chunk is enqueued: nothing after it may be counted
        assert all(last < chunk.refs[0].uri for _, last in flushed)
        skipped, after = point.enqueued(len(chunk.refs))
        resume.append((skipped, after or chunk.refs[-1].uri))
    resume.append(point.settle())
    # chunk 0f,2f: 1s counts with it, resume after 2f (3s and 4s are listed after it)
    assert resume[0] == (1, "s3://b/2f")
    # 3s and 4s: every fresh ref before them is enqueued, so they count before 5f is listed
    assert flushed == [(2, "s3://b/4s")]
    # chunk 5f (the last, partial): the trailing 6s counts with it, resume after 6s
    assert resume[1:] == [(1, "s3://b/6s"), (0, None)]


def test_a_run_of_skipped_refs_with_nothing_pending_moves_the_resume_point_at_once() -> None:
    marked = [(ref("0s"), True), (ref("1s"), True), (ref("2f"), False)]
    point, flushed = ResumePoint(), []
    fresh = point.fresh(marked, lambda count, last: flushed.append((count, last)))
    assert next(fresh).uri == "s3://b/2f"
    assert flushed == [(2, "s3://b/1s")]


def test_skipped_refs_behind_a_pending_fresh_ref_are_held_as_one_run_however_many() -> None:
    # the chunk of the changed object is never sent (its consumer waits): the skipped refs behind it
    # are held in constant space, not one entry per ref
    skipped = 3 * CUT_AFTER
    marked = chain([(ref("a-changed"), False)], ((ref(f"b{n:06d}"), True) for n in range(skipped)))
    point = ResumePoint()
    for _ in point.fresh(marked, lambda count, last: pytest.fail("nothing may count past a pending fresh ref")):
        pass
    assert len(point.held) == 1
    assert (point.held_count, point.held[0].last_uri) == (skipped, f"s3://b/b{skipped - 1:06d}")
    # once the changed object is enqueued, they all count, and the resume point moves past the last
    assert point.enqueued(1) == (skipped, f"s3://b/b{skipped - 1:06d}")
    assert not point.held


def test_progress_moves_every_few_thousand_refs_while_a_fresh_ref_waits_in_a_partial_chunk() -> None:
    # 1 changed object, then a long unchanged stretch with a few changed ones, and a dense stretch
    size, total = 128, 15_000
    fresh_at = {0, 6_000, 6_001, 10_777, *range(12_000, 12_300)}
    names = [f"{n:06d}" for n in range(total)]
    events = simulate_producer([(ref(name), n not in fresh_at) for n, name in enumerate(names)], size)
    position = {f"s3://b/{name}": n for n, name in enumerate(names)}
    positions = [position[uri] for _, _, uri in events]
    # the resume point moves forward, at least every CUT_AFTER skipped refs plus a chunk of fresh ones
    assert positions == sorted(positions) and positions[-1] == total - 1
    assert max(b - a for a, b in zip([-1, *positions], positions, strict=False)) <= CUT_AFTER + size
    assert sum(skipped for _, skipped, _ in events) == total - len(fresh_at)


def simulate_producer(marked: list[tuple[ImageRef, bool]], size: int) -> list[tuple[int, int, str]]:
    """What `Submission.run` does with a listing: (refs listed so far, skipped counted, resume point) each
    time the registry would be told, checking every time that the resume point passes no fresh ref that
    is not enqueued, and at the end that each fresh ref was enqueued once, in listing order."""
    listed, enqueued, events = 0, [], []
    fresh_refs = [r.uri for r, done in marked if not done]  # uris sort in listing order

    def counting() -> Iterator[tuple[ImageRef, bool]]:
        nonlocal listed
        for item in marked:
            listed += 1
            yield item

    def told(skipped: int, resume: str) -> None:
        waiting = fresh_refs[len(enqueued) : len(enqueued) + 1]  # the first fresh ref not enqueued yet
        assert not waiting or waiting[0] > resume, f"resume point {resume} passes {waiting[0]}, not enqueued"
        events.append((listed, skipped, resume))

    point = ResumePoint()
    for chunk in chunks("job", (Task.CAPTION,), point.fresh(counting(), told), size):
        enqueued += [r.uri for r in chunk.refs]
        skipped, after = point.enqueued(len(chunk.refs))
        told(skipped, after or chunk.refs[-1].uri)
    skipped, after = point.settle()
    if skipped:
        told(skipped, after or enqueued[-1])
    assert enqueued == fresh_refs
    return events


def test_a_cut_ends_the_chunk_being_filled_and_never_makes_an_empty_one() -> None:
    a, b, c = ref("a"), ref("b"), ref("c")
    cut = list(chunks("job", (Task.CAPTION,), [CUT, a, CUT, CUT, b, c, CUT], 5, first_seq=7))
    assert [([r.uri for r in chunk.refs], chunk.chunk_id) for chunk in cut] == [
        (["s3://b/a"], "job/000007"),
        (["s3://b/b", "s3://b/c"], "job/000008"),
    ]
