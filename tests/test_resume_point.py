"""The resume point of a listing moves only past refs enqueued or skipped, in listing order."""

from imagemill.core.schemas import ImageRef, Task
from imagemill.producer.chunking import chunks
from imagemill.producer.resume import ResumePoint


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
