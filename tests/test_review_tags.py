"""`--write-tags`: a decision becomes `imagemill-review=…` on its S3 object, merged as the object-tag sink merges."""

import pytest

from imagemill.core.settings import Settings
from imagemill.review.tags import ReviewTagger, merge_review_tag
from tests.fixtures.s3 import s3_client


def test_the_review_tag_joins_the_owners_tags_and_ours() -> None:
    existing = {"owner": "x", "imagemill-flagged": "true"}
    assert merge_review_tag(existing, "rejected") == {**existing, "imagemill-review": "rejected"}
    assert merge_review_tag({**existing, "imagemill-review": "rejected"}, None) == existing


def test_with_no_room_our_lowest_ranked_tag_makes_way_and_the_owners_always_stay() -> None:
    theirs = {f"t{i}": "v" for i in range(8)}
    ours = {"imagemill-flagged": "true", "imagemill-signature": "abc"}
    merged = merge_review_tag({**theirs, **ours}, "approved")
    assert merged == {**theirs, "imagemill-flagged": "true", "imagemill-review": "approved"}
    full = {f"t{i}": "v" for i in range(10)}
    assert merge_review_tag(full, "approved") is None


@pytest.fixture
def tagger(s3_env: str) -> ReviewTagger:
    return ReviewTagger(Settings())


def test_a_decision_is_tagged_onto_its_object_and_an_undo_removes_it(
    s3_env: str, bucket: str, tagger: ReviewTagger
) -> None:
    client = s3_client(s3_env)
    client.put_object(Bucket=bucket, Key="a.jpg", Body=b"x")
    client.put_object_tagging(Bucket=bucket, Key="a.jpg", Tagging={"TagSet": [{"Key": "owner", "Value": "me"}]})
    uri = f"s3://{bucket}/a.jpg"

    def tags() -> dict[str, str]:
        return {t["Key"]: t["Value"] for t in client.get_object_tagging(Bucket=bucket, Key="a.jpg")["TagSet"]}

    assert tagger.tag(uri, "escalated") == "tagged"
    assert tags() == {"owner": "me", "imagemill-review": "escalated"}
    assert tagger.tag(uri, "escalated") == "unchanged"
    assert tagger.tag(uri, None) == "tagged"
    assert tags() == {"owner": "me"}
    assert tagger.tag(f"s3://{bucket}/gone.jpg", "approved") == "missing"
    assert tagger.tag("file:///tmp/a.jpg", "approved") == "not_s3"
    tagger.close()
