"""The object-tags sink: results become tags on each record's own S3 object, beside the user's tags."""

import logging
import pickle
import re

import pytest
from botocore.exceptions import ClientError

from imagemill.core.errors import ErrorKind, UserError
from imagemill.core.schemas import Moderation, Record, RecordError, Tags, TagScore
from imagemill.core.settings import Settings
from imagemill.core.sinks import open_sink
from imagemill.core.sinks.s3tags import ObjectTagsSink, TaggingDenied, join_labels, object_tags
from tests.fixtures.faulty_s3 import faulty_proxy
from tests.fixtures.s3 import s3_client

ALLOWED_VALUE = re.compile(r"[A-Za-z0-9 +\-=._:/@]*")
SIGNATURE = "0123456789abcdef01234567"


def annotated(uri: str, flagged: bool = False, labels: tuple[str, ...] = ("dog", "beach")) -> Record:
    scores = {"nsfw": 0.93, "normal": 0.07} if flagged else {"nsfw": 0.02, "normal": 0.98}
    return Record(
        uri=uri,
        etag="abc",
        moderation=Moderation(flagged=flagged, scores=scores, model="m1"),
        tags=Tags(labels=[TagScore(tag=t, score=0.9 - i / 10) for i, t in enumerate(labels)], model="m2"),
        signature=SIGNATURE,
    )


def failed(uri: str, kind: ErrorKind = ErrorKind.FETCH_FAILED) -> Record:
    return Record(uri=uri, error=RecordError(kind=kind, message="boom"), signature=SIGNATURE)


def sink(endpoint: str, url: str = "s3tags://") -> ObjectTagsSink:
    return ObjectTagsSink.from_url(url, Settings(s3_endpoint_url=endpoint))


def put(endpoint: str, bucket: str, key: str, tags: dict[str, str] | None = None) -> str:
    tagging = "&".join(f"{k}={v}" for k, v in (tags or {}).items())
    s3_client(endpoint).put_object(Bucket=bucket, Key=key, Body=b"jpeg", Tagging=tagging)
    return f"s3://{bucket}/{key}"


def tags_of(endpoint: str, bucket: str, key: str) -> dict[str, str]:
    tag_set = s3_client(endpoint).get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    return {tag["Key"]: tag["Value"] for tag in tag_set}


def test_a_flagged_record_tags_its_object_with_its_results(s3_endpoint: str, bucket: str) -> None:
    uri = put(s3_endpoint, bucket, "photos/a.jpg")
    sink(s3_endpoint).write([annotated(uri, flagged=True)], "job/000001")
    assert tags_of(s3_endpoint, bucket, "photos/a.jpg") == {
        "imagemill-flagged": "true",
        "imagemill-moderation": "nsfw:0.93",
        "imagemill-tags": "dog/beach",
        "imagemill-signature": "0123456789ab",
    }


def test_an_unflagged_record_is_tagged_flagged_false(s3_endpoint: str, bucket: str) -> None:
    uri = put(s3_endpoint, bucket, "b.jpg")
    sink(s3_endpoint).write([annotated(uri, flagged=False)], "job/000001")
    tags = tags_of(s3_endpoint, bucket, "b.jpg")
    assert tags["imagemill-flagged"] == "false"
    assert tags["imagemill-moderation"] == "normal:0.98"


def test_user_tags_are_kept_and_our_old_tags_replaced_on_a_rewrite(s3_endpoint: str, bucket: str) -> None:
    uri = put(s3_endpoint, bucket, "c.jpg", {"owner": "alice", "project": "summer"})
    out = sink(s3_endpoint)
    out.write([annotated(uri, flagged=True, labels=("dog", "beach"))], "job/000001")
    out.write([annotated(uri, flagged=False, labels=("cat",))], "job/000001")
    assert tags_of(s3_endpoint, bucket, "c.jpg") == {
        "owner": "alice",
        "project": "summer",
        "imagemill-flagged": "false",
        "imagemill-moderation": "normal:0.98",
        "imagemill-tags": "cat",
        "imagemill-signature": "0123456789ab",
    }


def test_writing_the_same_record_twice_leaves_the_same_tags_without_a_second_put(s3_endpoint: str, bucket: str) -> None:
    uri = put(s3_endpoint, bucket, "d.jpg", {"owner": "alice"})
    with faulty_proxy(s3_endpoint) as proxy:  # the server's count of requests, not the sink's own
        out = sink(proxy.url)
        out.write([annotated(uri, flagged=True)], "job/000001")
        first = tags_of(s3_endpoint, bucket, "d.jpg")
        assert proxy.count("PUT", "d.jpg") == 1
        out.write([annotated(uri, flagged=True)], "job/000001")
        assert proxy.count("PUT", "d.jpg") == 1 and proxy.count("GET", "d.jpg") == 2  # read again, not written
    assert tags_of(s3_endpoint, bucket, "d.jpg") == first
    assert out.counts == {"tagged": 1, "unchanged": 1}


def test_tags_with_another_prefix_are_the_users_and_stay(s3_endpoint: str, bucket: str) -> None:
    uri = put(s3_endpoint, bucket, "e.jpg", {"imagemill-flagged": "true", "team": "x"})
    sink(s3_endpoint, "s3tags://?prefix=mill:").write([annotated(uri)], "job/000001")
    tags = tags_of(s3_endpoint, bucket, "e.jpg")
    assert tags["imagemill-flagged"] == "true" and tags["team"] == "x"
    assert tags["mill:flagged"] == "false" and tags["mill:tags"] == "dog/beach"


def test_an_object_near_the_ten_tag_limit_keeps_every_user_tag_and_our_most_important(
    s3_endpoint: str, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    user = {f"user{i}": str(i) for i in range(8)}
    uri = put(s3_endpoint, bucket, "f.jpg", user)
    with caplog.at_level(logging.WARNING, logger="imagemill.core.sinks.s3tags"):
        sink(s3_endpoint).write([annotated(uri, flagged=True)], "job/000001")
    tags = tags_of(s3_endpoint, bucket, "f.jpg")
    assert len(tags) == 10
    assert tags == {**user, "imagemill-flagged": "true", "imagemill-moderation": "nsfw:0.93"}
    assert "imagemill-tags, imagemill-signature" in caplog.text


def test_an_object_with_ten_user_tags_is_left_exactly_as_it_was(s3_endpoint: str, bucket: str) -> None:
    user = {f"user{i}": str(i) for i in range(10)}
    uri = put(s3_endpoint, bucket, "g.jpg", user)
    out = sink(s3_endpoint)
    out.write([failed(uri)], "job/000001")
    assert tags_of(s3_endpoint, bucket, "g.jpg") == user
    assert out.counts == {"unchanged": 1}


def test_an_error_is_kept_before_moderation_when_room_is_short(s3_endpoint: str, bucket: str) -> None:
    earlier = {"imagemill-flagged": "true", "imagemill-tags": "dog"}
    uri = put(s3_endpoint, bucket, "h.jpg", {**{f"u{i}": "v" for i in range(8)}, **earlier})
    sink(s3_endpoint).write([failed(uri)], "job/000001")
    tags = tags_of(s3_endpoint, bucket, "h.jpg")
    assert {k: v for k, v in tags.items() if k.startswith("imagemill-")} == {
        "imagemill-flagged": "true",
        "imagemill-error": "fetch_failed",
    }


def test_values_are_sanitised_to_s3s_alphabet_and_length(s3_endpoint: str, bucket: str) -> None:
    labels = ("hot dog", "dog, beach", "🐶 puppy", "café", "indoor/outdoor", "x" * 300)
    uri = put(s3_endpoint, bucket, "i.jpg")
    record = annotated(uri, labels=labels)
    sink(s3_endpoint).write([record], "job/000001")  # the server itself refuses a bad character
    tags = tags_of(s3_endpoint, bucket, "i.jpg")
    assert tags["imagemill-tags"] == "hot dog/dog beach/puppy/cafe/indoor outdoor"
    for key, value in tags.items():
        assert len(key) <= 128 and len(value) <= 256
        assert ALLOWED_VALUE.fullmatch(key) and ALLOWED_VALUE.fullmatch(value)


def test_labels_are_cut_at_a_label_boundary_to_fit_256_characters() -> None:
    joined = join_labels([f"label{i:03d}" for i in range(100)])
    assert len(joined) <= 256
    assert joined.split("/") == [f"label{i:03d}" for i in range(len(joined.split("/")))]
    assert len(joined) + len("/label999") > 256


def test_labels_that_sanitise_to_nothing_or_to_a_duplicate_are_dropped() -> None:
    assert join_labels(["🐶", "dog", "dog!", ",,,"]) == "dog"


def test_an_error_record_tags_its_error_kind(s3_endpoint: str, bucket: str) -> None:
    uri = put(s3_endpoint, bucket, "j.jpg")
    sink(s3_endpoint).write([failed(uri, ErrorKind.TRUNCATED)], "job/000001")
    assert tags_of(s3_endpoint, bucket, "j.jpg") == {
        "imagemill-error": "truncated",
        "imagemill-signature": "0123456789ab",
    }


def test_a_failed_rerun_never_unflags_an_object(s3_endpoint: str, bucket: str) -> None:
    uri = put(s3_endpoint, bucket, "k.jpg")
    out = sink(s3_endpoint)
    out.write([annotated(uri, flagged=True)], "job/000001")
    out.write([failed(uri)], "job2/000001")
    tags = tags_of(s3_endpoint, bucket, "k.jpg")
    assert tags["imagemill-flagged"] == "true" and tags["imagemill-error"] == "fetch_failed"


def test_a_successful_rerun_clears_an_earlier_error(s3_endpoint: str, bucket: str) -> None:
    uri = put(s3_endpoint, bucket, "l.jpg")
    out = sink(s3_endpoint)
    out.write([failed(uri)], "job/000001")
    out.write([annotated(uri)], "job2/000001")
    assert "imagemill-error" not in tags_of(s3_endpoint, bucket, "l.jpg")


def test_file_records_are_skipped_with_a_counted_warning(
    s3_endpoint: str, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    uri = put(s3_endpoint, bucket, "m.jpg")
    out = sink(s3_endpoint)
    with caplog.at_level(logging.WARNING, logger="imagemill.core.sinks.s3tags"):
        out.write([annotated("file:///photos/1.jpg"), annotated("file:///photos/2.jpg"), annotated(uri)], "job/000001")
    assert out.counts == {"not_s3": 2, "tagged": 1}
    assert "skipped 2 records" in caplog.text
    assert tags_of(s3_endpoint, bucket, "m.jpg")["imagemill-flagged"] == "false"


def test_a_deleted_object_does_not_fail_the_chunk(s3_endpoint: str, bucket: str) -> None:
    gone = put(s3_endpoint, bucket, "gone.jpg")
    kept = put(s3_endpoint, bucket, "kept.jpg")
    s3_client(s3_endpoint).delete_object(Bucket=bucket, Key="gone.jpg")
    out = sink(s3_endpoint)
    out.write([annotated(gone), annotated(kept)], "job/000001")
    assert out.counts == {"missing": 1, "tagged": 1}
    assert tags_of(s3_endpoint, bucket, "kept.jpg")["imagemill-tags"] == "dog/beach"


def test_two_records_for_one_object_in_a_chunk_leave_the_last_ones_tags(s3_endpoint: str, bucket: str) -> None:
    uri = put(s3_endpoint, bucket, "n.jpg")
    out = sink(s3_endpoint)
    out.write([annotated(uri, flagged=True), annotated(uri, flagged=False)], "job/000001")
    assert tags_of(s3_endpoint, bucket, "n.jpg")["imagemill-flagged"] == "false"
    assert out.counts == {"tagged": 1}


def test_access_denied_raises_a_retryable_error_naming_the_object_and_permissions(
    s3_endpoint: str, bucket: str
) -> None:
    uri = put(s3_endpoint, bucket, "secret.jpg")
    with faulty_proxy(s3_endpoint) as proxy:  # a real 403 answer from the S3 endpoint
        proxy.add_rule("GET", "secret.jpg", query_contains="tagging", status=403, code="AccessDenied")
        with pytest.raises(TaggingDenied) as caught:
            sink(proxy.url).write([annotated(uri)], "job/000001")
        assert proxy.count("GET", "secret.jpg") == 1  # a 403 is an answer: not retried by boto3
    assert isinstance(caught.value, ClientError)  # the chunk task retries ClientErrors, then fails the job
    assert uri in str(caught.value) and "s3:PutObjectTagging" in str(caught.value)
    assert str(pickle.loads(pickle.dumps(caught.value))) == str(caught.value)


def test_other_s3_errors_propagate_after_boto3s_attempts(s3_endpoint: str, bucket: str) -> None:
    uri = put(s3_endpoint, bucket, "a.jpg")
    with faulty_proxy(s3_endpoint) as proxy:
        proxy.add_rule("GET", "a.jpg", query_contains="tagging", status=500, code="InternalError")
        out = ObjectTagsSink.from_url("s3tags://", Settings(s3_endpoint_url=proxy.url, s3_max_attempts=2))
        with pytest.raises(ClientError, match="InternalError"):
            out.write([annotated(uri)], "job/000001")
        assert proxy.count("GET", "a.jpg") == 2  # IMAGEMILL_S3_MAX_ATTEMPTS in all, then the error
        assert proxy.count("PUT", "a.jpg") == 0


def test_object_tags_only_names_the_tasks_that_ran() -> None:
    record = Record(uri="s3://b/k", tags=Tags(labels=[TagScore(tag="dog", score=0.5)], model="m"), signature="s")
    assert object_tags(record, "p-") == {"p-tags": "dog", "p-signature": "s"}


def test_open_writer_gives_the_tags_sink_with_its_prefix() -> None:
    writer = open_sink("s3tags://?prefix=img+")
    assert isinstance(writer, ObjectTagsSink) and writer.prefix == "img+"
    assert isinstance(open_sink("s3tags://"), ObjectTagsSink)


@pytest.mark.parametrize(
    "url",
    [
        "s3tags://bucket/",
        "s3tags://?prefix=",
        "s3tags://?prefix=aws:x",
        "s3tags://?prefix=a%20b",
        "s3tags://?prefix=a,b",
        "s3tags://?prefix=a&prefix=b",
        "s3tags://?format=jsonl",
        "s3tags://?prefix=" + "p" * 120,
    ],
)
def test_a_bad_tags_url_is_a_user_error(url: str) -> None:
    with pytest.raises(UserError, match="sink s3tags://"):
        ObjectTagsSink.from_url(url)
