"""The review app's rules that need no server: its reviewers' tokens and roles, the bands against
the thresholds, where a login may send the browser, whom proxy mode believes, the queue's cursors."""

import json
from pathlib import Path

import pytest

from imagemill.core.errors import UserError
from imagemill.review.app import safe_next
from imagemill.review.auth import ProxyAuth
from imagemill.review.settings import Reviewer, ReviewSettings, Role, check_bands, load_tokens
from imagemill.review.store import Sort, decode_cursor, encode_cursor

LONG = "a-token-of-sixteen-or-more"


def test_a_reviewers_entry_is_a_token_or_a_token_and_a_role(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"alice": LONG + "1", "carol": {"token": LONG + "2", "role": "lead"}}))
    tokens = load_tokens(str(path))
    assert tokens.tokens == {"alice": LONG + "1", "carol": LONG + "2"}
    assert tokens.reviewer("alice") == Reviewer("alice", Role.REVIEWER)
    assert tokens.reviewer("carol").lead


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"alice": "short-token"}, "shorter than 16 characters"),
        ({"alice": {"token": LONG, "role": "boss"}}, "role must be one of reviewer, lead"),
        ({"alice": {"token": LONG, "extra": 1}}, 'expected only "token" and "role"'),
        ({"alice": LONG, "bob": LONG}, "share a token"),
        ({"auto": LONG}, "not 'auto'"),
    ],
)
def test_unusable_tokens_are_one_line_that_never_quotes_a_token(value: dict, words: str) -> None:
    with pytest.raises(UserError) as raised:
        load_tokens(json.dumps(value))
    message = str(raised.value)
    assert words in message and "\n" not in message and LONG not in message and "short-token" not in message


def test_proxy_mode_needs_no_tokens_but_its_proxies() -> None:
    assert load_tokens(None, required=False).tokens == {}
    with pytest.raises(UserError, match="IMAGEMILL_REVIEW_PROXY_ADDRESSES"):
        check_bands(ReviewSettings(auth="proxy"), {"nsfw": 0.5})


def test_auto_reject_bands_must_sit_on_thresholded_labels_above_their_threshold() -> None:
    check_bands(ReviewSettings(auto_reject={"nsfw": 0.97}), {"nsfw": 0.5})
    with pytest.raises(UserError, match="violence has no threshold"):
        check_bands(ReviewSettings(auto_reject={"violence": 0.9}), {"nsfw": 0.5})
    with pytest.raises(UserError, match="below its threshold"):
        check_bands(ReviewSettings(auto_reject={"nsfw": 0.4}), {"nsfw": 0.5})


@pytest.mark.parametrize(
    ("target", "followed"),
    [
        ("/", "/"),
        ("/?job=a&sort=age", "/?job=a&sort=age"),
        ("/stats", "/stats"),
        ("//evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("/\\/evil.example", "/"),
        ("/x\\y", "/"),
        ("https://evil.example/", "/"),
        ("javascript:alert(1)", "/"),
        ("", "/"),
        (None, "/"),
    ],
)
def test_a_login_sends_the_browser_only_to_a_path_on_this_site(target: str | None, followed: str) -> None:
    assert safe_next(target) == followed


def test_proxy_mode_believes_the_header_only_from_the_proxies_addresses() -> None:
    tokens = load_tokens(json.dumps({"carol": {"token": LONG, "role": "lead"}}))
    proxy = ProxyAuth("X-Forwarded-User", ["10.1.0.0/16", "::1/128"], tokens, "x-forwarded-groups", ["leads"])
    named = {"x-forwarded-user": "erin"}
    assert proxy.reviewer("10.1.2.3", named) == Reviewer("erin")
    assert proxy.reviewer("::1", named) == Reviewer("erin")
    assert proxy.reviewer("10.2.0.1", named) is None  # not one of the proxies
    assert proxy.reviewer(None, named) is None and proxy.reviewer("not-an-address", named) is None
    assert proxy.reviewer("10.1.2.3", {}) is None
    assert proxy.reviewer("10.1.2.3", {"x-forwarded-user": "a b"}) is None
    assert proxy.reviewer("10.1.2.3", {"x-forwarded-user": "auto"}) is None
    assert proxy.reviewer("10.1.2.3", {**named, "x-forwarded-groups": "staff,leads"}) == Reviewer("erin", Role.LEAD)
    assert proxy.reviewer("10.1.2.3", {"x-forwarded-user": "carol"}) == Reviewer("carol", Role.LEAD)


def test_a_cursor_carries_its_sort_key_and_refuses_another_sort_or_garbage() -> None:
    cursor = encode_cursor(0.987654321, "s3://b/a|b.jpg", '"e"')
    assert decode_cursor(cursor, Sort.SCORE) == (0.987654321, "s3://b/a|b.jpg", '"e"')
    with pytest.raises(ValueError, match="another sort order"):
        decode_cursor(cursor, Sort.AGE)
    for garbage in ("", "not-base64!", encode_cursor(1.0, "u", "e")[:-3]):
        with pytest.raises(ValueError):
            decode_cursor(garbage, Sort.SCORE)
