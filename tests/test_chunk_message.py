"""Message validation in process: what a chunk message may carry through the broker, at its bounds.

The fast specification of `ChunkMessage` and `ImageRef` (the worker's rejection of a malformed
message end to end is in tests/test_distributed.py); `python -m tools.mutation` runs it against
their mutants.
"""

from typing import Any

import pytest
from pydantic import ValidationError

from imagemill.core.schemas import MAX_CHUNK_REFS, ChunkMessage, ImageRef
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task

GOOD: dict[str, Any] = {
    "job_id": "job_1-A",
    "chunk_id": "job_1-A/000001",
    "tasks": ["moderation"],
    "refs": [{"uri": "s3://b/k.jpg", "etag": "e", "size": 3}],
}


def message(**changes: Any) -> ChunkMessage:
    return ChunkMessage.model_validate({**GOOD, **changes})


def test_a_good_message_round_trips_through_json() -> None:
    parsed = message()
    assert ChunkMessage.model_validate_json(parsed.model_dump_json()) == parsed
    assert parsed.tasks == (Task.MODERATION,) and parsed.refs[0].size == 3
    assert "problem" not in parsed.model_dump()["refs"][0]  # absent, not null, on a good ref


@pytest.mark.parametrize(
    "changes",
    [
        {"job_id": ""},
        {"job_id": "a" * 65},
        {"job_id": "job/1"},
        {"job_id": "job 1"},
        {"chunk_id": "job_1-A"},
        {"chunk_id": "job_1-A/"},
        {"chunk_id": "job_1-A/1234567890123"},
        {"chunk_id": "x" * 65 + "/1"},
        {"chunk_id": "job_1-A/1/2"},
        {"tasks": []},
        {"tasks": ["moderation"] * (len(Task) + 1)},
        {"tasks": ["unknown"]},
        {"refs": []},
        {"refs": [{"uri": ""}]},
        {"refs": [{"uri": "u" * 4097}]},
        {"refs": [{"uri": "s3://b/k", "etag": "e" * 257}]},
        {"refs": [{"uri": "s3://b/k", "size": -1}]},
        # times are epoch seconds: never before 1970
        {"refs": [{"uri": "s3://b/k", "event_time": -0.5}]},
        {"enqueued_at": -0.5},
        {"refs": [{"uri": "s3://b/k", "problem": "p" * 1001}]},
        {"refs": [{"uri": "s3://b/k", "data": "AAAA"}]},  # never image bytes
        {"image_bytes": "AAAA"},
        {"refs": "not a list"},
    ],
    ids=str,
)
def test_a_message_out_of_bounds_is_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        message(**changes)


def test_the_bounds_themselves_are_accepted() -> None:
    assert message(job_id="a" * 64, chunk_id="b" * 64 + "/" + "9" * 12).job_id == "a" * 64
    assert len(message(tasks=[t.value for t in Task]).tasks) == len(Task)
    ref = {"uri": "u" * 4096, "etag": "e" * 256, "size": 0, "problem": "p" * 1000, "event_time": 0.0}
    assert message(refs=[ref]).refs[0] == ImageRef(**ref)
    assert message(refs=[{"uri": "u"}]).refs[0].uri == "u"
    assert message(enqueued_at=0.0).enqueued_at == 0.0
    # the README's "at most 10,000 references", the most IMAGEMILL_CHUNK_SIZE allows
    assert len(message(refs=[{"uri": "s3://b/k"}] * 10_000).refs) == 10_000
    with pytest.raises(ValidationError):
        message(refs=[{"uri": "s3://b/k"}] * 10_001)
    assert Settings.model_fields["chunk_size"].metadata[-1].le == MAX_CHUNK_REFS
    with pytest.raises(ValidationError):
        ImageRef(uri="s3://b/k").uri = "other"  # type: ignore[misc]  # refs are frozen
