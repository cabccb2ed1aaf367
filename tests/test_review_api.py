"""The review app's API and its security, over a real PostgreSQL database and real HTTP (uvicorn).

Most tests share one database and one app (`shared`): each writes its own records under a job of
its own and claims only that job, so their queues never meet. Tests that need other settings, exact
counts or a database they may stop start their own.
"""

import concurrent.futures
import hashlib
import io
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from PIL import Image

from imagemill.core.schemas import Caption, ImageRef, Moderation, Record, Tags, TagScore
from imagemill.core.settings import Settings
from imagemill.core.sinks.postgres import PostgresSink
from imagemill.review.store import Bands, ReviewStore
from tests.fixtures.images import write_photos
from tests.fixtures.postgres import admin_url, fresh_database, private_postgres
from tests.fixtures.review import TOKENS, RunningApp, photo_records, review_app, write_records

pytestmark = pytest.mark.slow

REASONS = ("nudity", "violence", "spam")
_addresses = itertools.count(1)


def next_address() -> str:
    """A client address of its own (sent as X-Forwarded-For, which the shared app believes from
    127.0.0.1): the login limits count per address, and tests must not share one."""
    n = next(_addresses)
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


@pytest.fixture(scope="module")
def shared() -> Iterator[RunningApp]:
    with (
        fresh_database(admin_url()) as sink,
        review_app(sink, audit_rate=0.0, reasons=REASONS, forwarded_allow_ips="127.0.0.1") as app,
    ):
        yield app


@pytest.fixture
def job(request: pytest.FixtureRequest) -> str:
    return "job-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]


@pytest.fixture
def records(shared: RunningApp, tmp_path: Path, job: str) -> list[Record]:
    """Six flagged (nsfw 0.99 … 0.94) and four unflagged records of this test's own job."""
    made = photo_records(tmp_path / "photos", flagged=6, unflagged=4, job_id=job)
    write_records(shared.sink, made)
    return made


@contextmanager
def own_app(tmp_path: Path, flagged: int = 6, unflagged: int = 4, **settings: Any) -> Iterator[RunningApp]:
    """A database and an app of this test's own, with `flagged` + `unflagged` records of job-1.

    No audits and no second looks unless a test asks: both are drawn by a hash of the uri, and the
    uris hold tmp_path, so a nonzero rate would pick a different handful in every run."""
    with fresh_database(admin_url()) as sink:
        if flagged or unflagged:
            write_records(sink, photo_records(tmp_path / "own", flagged=flagged, unflagged=unflagged))
        quiet = {"audit_rate": 0.0, "second_look_rate": 0.0, "auto_audit_rate": 0.0}
        with review_app(sink, **{**quiet, **settings}) as app:
            yield app


def claim(app: RunningApp, reviewer: str, job: str | None = None, limit: int = 50, **params: Any) -> list[dict]:
    with app.client(reviewer) as client:
        response = client.get("/api/queue", params={"limit": limit, **({"job": job} if job else {}), **params})
    assert response.status_code == 200, response.text
    return response.json()["items"]


def decide(app: RunningApp, reviewer: str, uri: str, etag: str, decision: str = "approve", **extra: object):
    with app.client(reviewer) as client:
        return client.post("/api/decisions", json={"uri": uri, "etag": etag, "decision": decision, **extra})


def counts(app: RunningApp, reviewer: str = "alice", **params: Any) -> dict[str, Any]:
    with app.client(reviewer) as client:
        return client.get("/api/counts", params=params).json()


def review_rows(sink: str, uris: Sequence[str] | None = None) -> list[tuple]:
    """(uri, etag, decision, reviewer, note) of the decision log, of these uris when given."""
    with psycopg.connect(sink) as conn:
        rows = conn.execute("SELECT uri, etag, decision, reviewer, note FROM imagemill_reviews ORDER BY id").fetchall()
    return [row for row in rows if uris is None or row[0] in uris]


def claims_of(sink: str, reviewer: str) -> set[str]:
    with psycopg.connect(sink) as conn:
        rows = conn.execute(
            "SELECT uri FROM imagemill_review_claims WHERE reviewer = %s AND expires_at > now()", (reviewer,)
        ).fetchall()
    return {uri for (uri,) in rows}


def login(app: RunningApp, reviewer: str, address: str | None = None) -> tuple[httpx.Client, str]:
    """A browser-like client logged in through the form: (client, csrf token from the page)."""
    client = app.client()
    client.headers["X-Forwarded-For"] = address or next_address()
    form = client.get("/login")
    nonce = form.text.split('name="nonce" value="')[1].split('"')[0]
    done = client.post("/login", data={"reviewer": reviewer, "token": TOKENS[reviewer], "nonce": nonce, "next": "/"})
    assert done.status_code == 303 and done.headers["location"] == "/", done.text
    cookie = done.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    page = client.get("/")
    assert page.status_code == 200
    csrf = page.text.split('data-csrf="')[1].split('"')[0]
    return client, csrf


def wrong_login(client: httpx.Client, reviewer: str, token: str = "not-the-token-0123456789") -> httpx.Response:
    form = client.get("/login")
    nonce = form.text.split('name="nonce" value="')[1].split('"')[0]
    return client.post("/login", data={"reviewer": reviewer, "token": token, "nonce": nonce})


def shift_claims(sink: str, reviewer: str, seconds: float) -> None:
    """Make the reviewer's claims end `seconds` from now (negative: already ended), as if that much
    of the lease had passed: no test waits for a clock."""
    with psycopg.connect(sink) as conn:
        conn.execute(
            "UPDATE imagemill_review_claims SET expires_at = now() + make_interval(secs => %s) WHERE reviewer = %s",
            (seconds, reviewer),
        )


# -- who may ask ------------------------------------------------------------------------------------


def test_without_a_token_the_api_is_401_and_pages_lead_to_the_login_form(
    shared: RunningApp, records: list[Record]
) -> None:
    with shared.client() as client:
        for path in (
            "/api/queue",
            "/api/counts",
            "/api/stats",
            "/metrics",
            f"/api/thumbnail?uri={records[0].uri}&etag=x",
        ):
            response = client.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
        for path in ("/api/decisions", "/api/undo", "/api/claims/renew", "/api/claims/release"):
            assert client.post(path, json={}).status_code == 401, path
        for page in ("/", "/stats"):
            response = client.get(page)
            assert response.status_code == 303 and response.headers["location"].startswith("/login")
        assert client.get("/healthz").json() == {"status": "ok"}
        login_page = client.get("/login")
        assert login_page.status_code == 200 and "Token" in login_page.text


def test_a_wrong_token_is_401_and_never_echoed(shared: RunningApp) -> None:
    with shared.client() as client:
        client.headers["X-Forwarded-For"] = next_address()
        wrong = "not-a-reviewers-token-xyz"
        for header in (f"Bearer {wrong}", f"Bearer {TOKENS['alice']}x", "Basic YWxpY2U6eA==", "Bearer"):
            response = client.get("/api/queue", headers={"Authorization": header})
            assert response.status_code == 401
        refused = wrong_login(client, "alice", wrong)
        assert refused.status_code == 401 and wrong not in refused.text
        assert "imagemill_review=" not in refused.headers.get("set-cookie", "")
        # the right token under another reviewer's name is no login either
        assert wrong_login(client, "bob", TOKENS["alice"]).status_code == 401


def test_login_needs_the_forms_own_nonce(shared: RunningApp) -> None:
    with shared.client() as client:
        response = client.post("/login", data={"reviewer": "alice", "token": TOKENS["alice"], "nonce": "made-up"})
        assert response.status_code == 400
        assert "imagemill_review=" not in response.headers.get("set-cookie", "")


@pytest.mark.parametrize("target", ["//evil.example/x", "/\\evil.example", "https://evil.example/", "/\\/evil", ""])
def test_login_never_redirects_off_the_site(shared: RunningApp, target: str) -> None:
    """The open-redirect guard: `next` is followed only when it is a path on this site."""
    with shared.client() as client:
        client.headers["X-Forwarded-For"] = next_address()
        form = client.get("/login", params={"next": target})
        nonce = form.text.split('name="nonce" value="')[1].split('"')[0]
        assert 'name="next" value="/"' in form.text
        done = client.post("/login", data={"reviewer": "dave", "token": TOKENS["dave"], "nonce": nonce, "next": target})
    assert done.status_code == 303 and done.headers["location"] == "/"


def test_logout_revokes_the_session_and_releases_its_claims(
    shared: RunningApp, records: list[Record], job: str
) -> None:
    client, csrf = login(shared, "alice")
    try:
        held = {i["uri"] for i in client.get("/api/queue", params={"job": job, "limit": 3}).json()["items"]}
        assert held <= claims_of(shared.sink, "alice") and len(held) == 3
        cookie = client.cookies.get("imagemill_review")
        assert client.post("/logout", data={"csrf": csrf}).status_code == 303
        assert not held & claims_of(shared.sink, "alice")
        # the cookie replayed after logout is worth nothing: the session is gone from the database
        with shared.client() as replay:
            replay.cookies.set("imagemill_review", cookie or "")
            assert replay.get("/api/queue", params={"job": job}).status_code == 401
            assert replay.get("/").status_code == 303
    finally:
        client.close()
    assert {i["uri"] for i in claim(shared, "bob", job, limit=3)} == held


def test_a_changed_token_ends_its_reviewers_sessions(tmp_path: Path) -> None:
    with fresh_database(admin_url()) as sink:
        with review_app(sink) as first:
            alice, _ = login(first, "alice")
            bob, _ = login(first, "bob")
            kept = {name: client.cookies.get("imagemill_review") for name, client in (("alice", alice), ("bob", bob))}
            alice.close()
            bob.close()
        rotated = json.dumps({**TOKENS, "alice": "alice-rotated-token-0123456789"})
        with review_app(sink, tokens=rotated) as second:
            for name, expected in (("alice", 401), ("bob", 200)):
                with second.client() as client:
                    client.cookies.set("imagemill_review", kept[name] or "")
                    assert client.get("/api/counts").status_code == expected, name


def test_an_idle_session_ends_and_a_live_one_lasts(shared: RunningApp) -> None:
    client, _ = login(shared, "bob")
    try:
        assert client.get("/api/counts").status_code == 200
        with psycopg.connect(shared.sink) as conn:  # as if it had been left alone for an hour
            conn.execute(
                "UPDATE imagemill_review_sessions SET last_seen = now() - interval '1 hour' WHERE reviewer = 'bob'"
            )
        assert client.get("/api/counts").status_code == 401
    finally:
        client.close()


def test_thirty_wrong_logins_meet_a_429_per_address_and_per_reviewer(shared: RunningApp) -> None:
    address = next_address()
    with shared.client() as client:
        client.headers["X-Forwarded-For"] = address
        answers = [wrong_login(client, f"nobody{n}").status_code for n in range(30)]
        assert answers[:20] == [401] * 20 and set(answers[20:]) == {429}
        limited = wrong_login(client, "alice", TOKENS["alice"])  # the right token changes nothing now
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
        # Bearer tokens from that address are refused too, even the right one
        refused = client.get("/api/counts", headers={"Authorization": f"Bearer {TOKENS['alice']}"})
        assert refused.status_code == 429 and refused.json()["error"] and int(refused.headers["retry-after"]) > 0
    # one reviewer's name, tried from many addresses
    answers = []
    for _ in range(12):
        with shared.client() as client:
            client.headers["X-Forwarded-For"] = next_address()
            answers.append(wrong_login(client, "carol").status_code)
    assert answers[:10] == [401] * 10 and set(answers[10:]) == {429}
    with shared.client() as client:
        client.headers["X-Forwarded-For"] = next_address()
        assert wrong_login(client, "carol", TOKENS["carol"]).status_code == 429
        assert wrong_login(client, "dave", TOKENS["dave"]).status_code == 303  # others log in as ever


def test_cookies_are_secure_behind_a_trusted_proxy_only(shared: RunningApp, tmp_path: Path) -> None:
    with shared.client() as client:
        client.headers["X-Forwarded-For"] = next_address()
        client.headers["X-Forwarded-Proto"] = "https"
        assert "; secure" in client.get("/login").headers["set-cookie"].lower()
    with own_app(tmp_path, flagged=0, unflagged=0) as untrusting, untrusting.client() as client:
        # no IMAGEMILL_REVIEW_FORWARDED_ALLOW_IPS: anyone could send the header, so it says nothing
        client.headers["X-Forwarded-Proto"] = "https"
        assert "; secure" not in client.get("/login").headers["set-cookie"].lower()


# -- the queue and leases ---------------------------------------------------------------------------


def test_two_reviewers_claims_never_overlap_even_at_the_same_moment(
    shared: RunningApp, records: list[Record], job: str
) -> None:
    def uris(reviewer: str) -> set[str]:
        return {item["uri"] for item in claim(shared, reviewer, job, limit=4)}

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        alice, bob = pool.map(uris, ["alice", "bob"])
    assert alice and bob and not alice & bob
    assert alice | bob == {r.uri for r in records if r.moderation and r.moderation.flagged}
    # asking again gives each their own claims back, renewed, never the other's
    assert uris("alice") == alice and uris("bob") == bob


def test_a_claim_is_renewed_past_its_lease_and_a_lapsed_one_is_reported_lost(
    shared: RunningApp, records: list[Record], job: str
) -> None:
    """A slow reviewer keeps its items as long as its page renews them; an item whose lease ran out
    is lost, and renewing says so instead of pretending."""
    items = claim(shared, "alice", job, limit=6)
    until = {i["uri"]: datetime.fromisoformat(i["claimed_until"]) for i in items}
    assert all(until.values())
    shift_claims(shared.sink, "alice", 1)  # 299 of the 300 s have passed
    keys = [{"uri": i["uri"], "etag": i["etag"]} for i in items]
    with shared.client("alice") as client:
        renewed = client.post("/api/claims/renew", json={"items": keys}).json()
    assert renewed["lost"] == [] and len(renewed["renewed"]) == 6
    assert all(datetime.fromisoformat(r["claimed_until"]) >= until[r["uri"]] for r in renewed["renewed"])
    assert claim(shared, "bob", job) == []  # still alice's: nothing for bob
    # now one lease runs out before the page renews it: bob takes it, and alice's renewal reports it lost
    first = items[0]
    with psycopg.connect(shared.sink) as conn:
        conn.execute(
            "UPDATE imagemill_review_claims SET expires_at = now() - interval '1 second' WHERE uri = %s",
            (first["uri"],),
        )
    assert [i["uri"] for i in claim(shared, "bob", job)] == [first["uri"]]
    with shared.client("alice") as client:
        again = client.post("/api/claims/renew", json={"items": keys}).json()
    assert again["lost"] == [{"uri": first["uri"], "etag": first["etag"]}] and len(again["renewed"]) == 5
    assert decide(shared, "alice", first["uri"], first["etag"]).status_code == 409


def test_a_lease_that_expires_returns_the_item_to_the_queue(
    shared: RunningApp, records: list[Record], job: str
) -> None:
    mine = {i["uri"] for i in claim(shared, "alice", job)}
    assert len(mine) == 6
    assert claim(shared, "bob", job) == []
    before = shared.client("bob").get("/metrics").text
    shift_claims(shared.sink, "alice", -1)
    theirs = {i["uri"] for i in claim(shared, "bob", job)}
    assert theirs == mine
    expired = [
        line
        for line in shared.client("bob").get("/metrics").text.splitlines()
        if line.startswith("imagemill_review_lease_expiries_total")
    ]
    earlier = [line for line in before.splitlines() if line.startswith("imagemill_review_lease_expiries_total")]
    assert float(expired[0].split()[-1]) >= float(earlier[0].split()[-1]) + 6
    first = sorted(mine)[0]
    etag = next(r.etag for r in records if r.uri == first)
    assert decide(shared, "alice", first, etag or "").status_code == 409


def test_skip_releases_an_item_at_once(shared: RunningApp, records: list[Record], job: str) -> None:
    first, *rest = claim(shared, "alice", job, limit=3)
    with shared.client("alice") as client:
        released = client.post("/api/claims/release", json={"items": [{"uri": first["uri"], "etag": first["etag"]}]})
        assert released.json() == {"released": 1}
        assert client.post("/api/claims/release", json={}).status_code == 422
    assert first["uri"] in {i["uri"] for i in claim(shared, "bob", job)}
    with shared.client("alice") as client:
        assert client.post("/api/claims/release", json={"all": True}).json()["released"] >= 2
    assert not claims_of(shared.sink, "alice") & {i["uri"] for i in rest}


# -- what an item says ------------------------------------------------------------------------------


def test_an_item_carries_each_thresholded_labels_score_and_threshold(
    shared: RunningApp, records: list[Record], job: str
) -> None:
    with shared.client("alice") as client:
        body = client.get("/api/queue", params={"limit": 1, "job": job}).json()
    (item,) = body["items"]
    first = records[0]
    assert item["uri"] == first.uri and item["etag"] == first.etag and item["job_id"] == job
    assert item["flagged"] is True and item["reason"] == "flagged"
    assert item["scores"] == {"nsfw": 0.99, "normal": 0.01}
    assert item["labels"] == [{"label": "nsfw", "score": 0.99, "threshold": 0.5, "crossed": True}]
    assert item["caption"] == "a test photo number 0"
    assert [tag["tag"] for tag in item["tags"]] == ["landscape", "sky"]
    assert item["thumbnail_url"].startswith("/api/thumbnail?uri=") and item["image_url"].startswith("/api/image?uri=")
    assert item["claimed_until"] is not None
    assert body["lease_s"] == 300 and body["role"] == "reviewer"


def multi_label_records(folder: Path) -> list[Record]:
    """Five records under two thresholded labels (nsfw at 0.5, violence at 0.8), stored at known times."""
    rows = [  # (nsfw, violence, flagged, minutes after the first)
        (0.97, 0.10, True, 4),
        (0.62, 0.91, True, 0),
        (0.55, 0.20, True, 2),
        (0.30, 0.85, True, 3),
        (0.20, 0.10, False, 1),
    ]
    records = []
    for index, (path, (nsfw, violence, flagged, _)) in enumerate(
        zip(photo_paths(folder, len(rows)), rows, strict=True)
    ):
        records.append(
            Record(
                uri=path.as_uri(),
                etag=f"e{index}",
                signature="sig",
                job_id="job-1",
                moderation=Moderation(flagged=flagged, scores={"nsfw": nsfw, "violence": violence}, model="m"),
            )
        )
    return records


def photo_paths(folder: Path, count: int) -> list[Path]:
    return write_photos(folder, count, 64, 48)


def test_the_queue_sorts_by_score_or_age_filters_by_label_and_says_what_crossed(tmp_path: Path) -> None:
    core = Settings(moderation_thresholds={"nsfw": 0.5, "violence": 0.8})
    made = multi_label_records(tmp_path / "m")
    with fresh_database(admin_url()) as sink:
        write_records(sink, made)
        minutes = [4, 0, 2, 3, 1]
        with psycopg.connect(sink) as conn:
            for record, offset in zip(made, minutes, strict=True):
                conn.execute(
                    "UPDATE imagemill_records SET written_at = '2026-01-01'::timestamptz + make_interval(mins => %s)"
                    " WHERE uri = %s",
                    (offset, record.uri),
                )
        with review_app(sink, core=core, audit_rate=1.0) as app:
            by_score = claim(app, "alice")
            # the highest thresholded score first; the audit sample (the unflagged one) says so
            assert [(round(max(i["scores"].values()), 2), i["reason"]) for i in by_score] == [
                (0.97, "flagged"),
                (0.91, "flagged"),
                (0.85, "flagged"),
                (0.55, "flagged"),
                (0.2, "audit"),
            ]
            second = by_score[1]
            assert second["labels"] == [
                {"label": "violence", "score": 0.91, "threshold": 0.8, "crossed": True},
                {"label": "nsfw", "score": 0.62, "threshold": 0.5, "crossed": True},
            ]
            fourth = by_score[2]
            assert [(label["label"], label["crossed"]) for label in fourth["labels"]] == [
                ("violence", True),
                ("nsfw", False),
            ]
            by_age = claim(app, "alice", sort="age")
            assert [i["uri"] for i in by_age] == [made[i].uri for i in (1, 4, 2, 3, 0)]
            violence = claim(app, "alice", label="violence")
            assert [i["labels"][0]["score"] for i in violence] == [0.91, 0.85]
            assert [i["uri"] for i in claim(app, "alice", label="nsfw", max=0.9)] == [made[1].uri, made[2].uri]
            with app.client("alice") as client:
                assert client.get("/api/queue", params={"label": "normal"}).status_code == 422
                assert client.get("/api/queue", params={"sort": "random"}).status_code == 422
                assert client.get("/api/queue", params={"after": "not-a-cursor"}).status_code == 422
                assert client.get("/api/counts", params={"label": "violence"}).json()["left"] == 2


def test_filters_by_job_and_score(shared: RunningApp, tmp_path: Path, job: str) -> None:
    write_records(shared.sink, photo_records(tmp_path / "a", flagged=5, job_id=job + "-a"))
    write_records(shared.sink, photo_records(tmp_path / "b", flagged=3, job_id=job + "-b"))
    # nsfw scores are 0.99, 0.98, ... per job
    assert len(claim(shared, "dave", job + "-b")) == 3
    assert len(claim(shared, "alice", job + "-a", label="nsfw", min=0.975)) == 2
    assert len(claim(shared, "alice", job + "-a", max=0.965)) == 2
    assert counts(shared, job=job + "-a")["left"] == 5


def test_keyset_pages_continue_after_the_last_item(shared: RunningApp, tmp_path: Path, job: str) -> None:
    write_records(shared.sink, photo_records(tmp_path / "p", flagged=7, job_id=job))
    with shared.client("alice") as client:
        first = client.get("/api/queue", params={"limit": 4, "job": job}).json()
        assert first["next_after"] == first["items"][-1]["cursor"]
        second = client.get("/api/queue", params={"limit": 4, "job": job, "after": first["next_after"]}).json()
    scores = [i["scores"]["nsfw"] for i in first["items"] + second["items"]]
    assert scores == sorted(scores, reverse=True) and len(second["items"]) == 3 and second["next_after"] is None
    assert not {i["uri"] for i in first["items"]} & {i["uri"] for i in second["items"]}


class PageMarkup(HTMLParser):
    """What a browser would run or show on a page: its scripts, event-handler attributes, the cards'
    attributes, and the text inside elements, by their class attribute."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.scripts: list[str | None] = []
        self.handlers: list[str] = []
        self.cards: list[dict[str, str | None]] = []
        self.text: dict[str, list[str]] = {}
        self._open: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "script":
            self.scripts.append(named.get("src"))
        self.handlers += [f"<{tag} {name}>" for name in named if name.startswith("on")]
        if tag == "article":
            self.cards.append(named)
        if tag not in ("br", "img", "input", "meta", "link"):
            self._open.append(named.get("class") or "")

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for name in dict.fromkeys(self._open):  # the text of an element and of those around it
            self.text.setdefault(name, []).append(data)


HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_html_in_a_record_is_shown_as_text_on_the_page(shared: RunningApp, job: str) -> None:
    """Captions, uris, tags and labels come from models and from whoever named the objects: the page
    shows them as text, never as markup (it is rendered on the server; review.js sets only textContent)."""
    uri = f"s3://bucket/{HOSTILE}.jpg"
    hostile_job = job + '"><script>alert(2)</script>'
    write_records(
        shared.sink,
        [
            Record(
                uri=uri,
                etag='"etag"><script>alert(3)</script>',
                signature="sig",
                job_id=hostile_job,
                caption=Caption(text=HOSTILE, model="m"),
                moderation=Moderation(flagged=True, scores={"nsfw": 0.9, HOSTILE: 0.5}, model="m"),
                tags=Tags(labels=[TagScore(tag=HOSTILE, score=0.4)], model="m"),
            )
        ],
    )
    client, _ = login(shared, "alice")
    page = client.get("/", params={"job": hostile_job})
    client.close()
    assert page.status_code == 200
    markup = PageMarkup(page.text)
    assert markup.scripts == ["/static/review.js"] and markup.handlers == []
    (card,) = markup.cards
    assert (card["data-uri"], card["data-etag"]) == (uri, '"etag"><script>alert(3)</script>')
    assert markup.text["caption"] == [HOSTILE] and markup.text["uri"] == [uri]
    assert HOSTILE in markup.text["tags"] and HOSTILE in markup.text["scores"]
    assert "0.900" in markup.text["score"] and "≥ 0.500" in markup.text["threshold"]


def test_thumbnails_and_full_size_only_for_records_in_the_store(
    shared: RunningApp, records: list[Record], tmp_path: Path, job: str
) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((tmp_path / "photos" / "photo_0000.jpg").read_bytes())
    photo_dir = records[0].uri.rsplit("/", 1)[0]
    item = claim(shared, "alice", job, limit=1)[0]
    with shared.client("alice") as client:
        response = client.get(item["thumbnail_url"])
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        assert "private" in response.headers["cache-control"]
        assert max(Image.open(io.BytesIO(response.content)).size) <= 512
        assert client.get(item["thumbnail_url"], headers={"If-None-Match": response.headers["etag"]}).status_code == 304
        full = client.get(item["image_url"])
        assert full.status_code == 200 and Image.open(io.BytesIO(full.content)).size == (320, 240)
        for path in ("/api/thumbnail", "/api/image"):
            for uri, etag in [
                (outside.as_uri(), records[0].etag),  # an image on disk, but no record
                ("file:///etc/passwd", ""),
                (f"{photo_dir}/../photos/photo_0000.jpg", records[0].etag),
                (f"{photo_dir}/%2e%2e/photos/photo_0000.jpg", records[0].etag),
                ("s3://bucket/key.jpg", ""),
                ("http://169.254.169.254/latest/meta-data", ""),
                (records[0].uri, "another-etag"),
            ]:
                refused = client.get(path, params={"uri": uri, "etag": etag})
                assert refused.status_code == 404, uri
                assert refused.headers["content-type"].startswith("application/json")


def test_the_audit_sample_is_chosen_by_the_uri(tmp_path: Path) -> None:
    made = photo_records(tmp_path / "photos", flagged=0, unflagged=40)
    rate = 0.5
    expected = {r.uri for r in made if int(hashlib.md5(r.uri.encode()).hexdigest()[:8], 16) < rate * 2**32}
    assert 0 < len(expected) < 40
    with fresh_database(admin_url()) as sink:
        write_records(sink, made)
        for _ in range(2):  # the same sample every time
            with review_app(sink, audit_rate=rate) as app:
                items = claim(app, "alice", limit=100)
            assert {i["uri"] for i in items} == expected
            assert {i["reason"] for i in items} == {"audit"}


# -- decisions --------------------------------------------------------------------------------------


def test_a_decision_is_stored_with_its_note_and_reason_and_leaves_the_queue(
    shared: RunningApp, records: list[Record], job: str
) -> None:
    item = claim(shared, "alice", job, limit=1)[0]
    response = decide(shared, "alice", item["uri"], item["etag"], "reject", note="clearly not ok", reason="nudity")
    assert response.status_code == 200
    body = response.json()
    assert (body["decision"], body["reviewer"], body["role"], body["reason"]) == (
        "reject",
        "alice",
        "reviewer",
        "nudity",
    )
    assert review_rows(shared.sink, [item["uri"]]) == [(item["uri"], item["etag"], "reject", "alice", "clearly not ok")]
    assert item["uri"] not in {i["uri"] for i in claim(shared, "alice", job)}
    assert item["uri"] not in {i["uri"] for i in claim(shared, "bob", job)}
    unknown = decide(shared, "alice", records[1].uri, records[1].etag or "", "reject", reason="boredom")
    assert unknown.status_code == 422 and "nudity" in unknown.json()["error"]


def test_a_decision_on_another_reviewers_claim_is_409_and_an_unknown_item_404(
    shared: RunningApp, records: list[Record], job: str
) -> None:
    item = claim(shared, "alice", job, limit=1)[0]
    assert decide(shared, "bob", item["uri"], item["etag"]).status_code == 409
    assert decide(shared, "bob", "file:///nowhere/x.jpg", "e").status_code == 404
    assert decide(shared, "bob", item["uri"], "another-etag").status_code == 404
    assert review_rows(shared.sink, [item["uri"]]) == []
    assert decide(shared, "alice", item["uri"], item["etag"]).status_code == 200


def test_a_second_decision_on_a_decided_item_is_409_with_the_standing_decision(
    shared: RunningApp, records: list[Record], job: str
) -> None:
    """Before: bob's decision on alice's decided item returned 200 and silently became the decision."""
    item = claim(shared, "alice", job, limit=1)[0]
    assert decide(shared, "alice", item["uri"], item["etag"], "approve", note="fine").status_code == 200
    refused = decide(shared, "bob", item["uri"], item["etag"], "reject")
    assert refused.status_code == 409
    standing = refused.json()["decision"]
    assert (standing["reviewer"], standing["decision"], standing["note"]) == ("alice", "approve", "fine")
    assert "alice" in refused.json()["error"]
    assert [row[2:4] for row in review_rows(shared.sink, [item["uri"]])] == [("approve", "alice")]
    # a reviewer may not override; alice may change her own decision
    reviewer_override = decide(shared, "bob", item["uri"], item["etag"], "reject", override=True)
    assert reviewer_override.status_code == 403
    assert decide(shared, "alice", item["uri"], item["etag"], "reject").status_code == 200


def test_a_lead_overrides_a_standing_decision_recorded_as_such(
    shared: RunningApp, records: list[Record], job: str, tmp_path: Path
) -> None:
    item = claim(shared, "alice", job, limit=1)[0]
    assert decide(shared, "alice", item["uri"], item["etag"], "approve").status_code == 200
    assert decide(shared, "carol", item["uri"], item["etag"], "reject").status_code == 409  # a lead must say so
    overridden = decide(shared, "carol", item["uri"], item["etag"], "reject", override=True, note="policy 4.2")
    assert overridden.status_code == 200
    assert (overridden.json()["override"], overridden.json()["role"]) == (True, "lead")
    assert decide(shared, "alice", item["uri"], item["etag"], "approve").status_code == 409
    out = tmp_path / "decisions.jsonl"
    done = run_cli("review", "export", "--all", "--sink", shared.sink, "--out", str(out), env={})
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines() if json.loads(line)["uri"] == item["uri"]]
    assert [(r["reviewer"], r["decision"], r["role"], r["override"]) for r in rows] == [
        ("alice", "approve", "reviewer", False),
        ("carol", "reject", "lead", True),
    ]


def test_escalated_items_go_to_the_leads_queue_where_a_leads_decision_is_final(
    shared: RunningApp, records: list[Record], job: str
) -> None:
    item = claim(shared, "alice", job, limit=1)[0]
    assert decide(shared, "alice", item["uri"], item["etag"], "escalate").status_code == 200
    assert item["uri"] not in {i["uri"] for i in claim(shared, "bob", job)}
    with shared.client("bob") as client:
        assert client.get("/api/queue", params={"queue": "leads", "job": job}).status_code == 403
    leads = claim(shared, "carol", job, queue="leads")
    assert [(i["uri"], i["reason"]) for i in leads] == [(item["uri"], "escalated")]
    assert decide(shared, "bob", item["uri"], item["etag"], "approve").status_code == 409
    final = decide(shared, "carol", item["uri"], item["etag"], "reject")
    assert final.status_code == 200 and final.json()["override"] is False
    assert claim(shared, "carol", job, queue="leads") == []
    assert decide(shared, "alice", item["uri"], item["etag"], "approve").status_code == 409


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"uri": "file:///a.jpg", "etag": "e"}',
        b'{"uri": "file:///a.jpg", "etag": "e", "decision": "delete"}',
        b'{"uri": "", "etag": "e", "decision": "approve"}',
        b'{"uri": 5, "etag": "e", "decision": "approve"}',
        b'{"uri": "file:///a.jpg", "etag": "e", "decision": "approve", "extra": 1}',
        b'{"uri": "file:///a.jpg", "etag": "e", "decision": "approve", "override": "yes please"}',
        json.dumps({"uri": "file:///a.jpg", "etag": "e", "decision": "approve", "note": "n" * 2001}).encode(),
    ],
    ids=[
        "not-json",
        "array",
        "no-decision",
        "unknown-decision",
        "empty-uri",
        "uri-not-text",
        "extra-field",
        "override-not-bool",
        "long-note",
    ],
)
def test_a_malformed_decision_is_422_with_a_message(shared: RunningApp, body: bytes) -> None:
    with shared.client("alice") as client:
        response = client.post("/api/decisions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]
    assert review_rows(shared.sink, ["file:///a.jpg"]) == []


def test_an_oversized_body_is_refused_unread(shared: RunningApp, records: list[Record]) -> None:
    huge = json.dumps({"uri": records[0].uri, "etag": records[0].etag, "decision": "approve", "note": "x" * 100_000})
    with shared.client("alice") as client:
        assert client.post("/api/decisions", content=huge).status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: the size is counted as it streams
            for _ in range(100):
                yield b"x" * 1024

        assert client.post("/api/decisions", content=chunks()).status_code == 413
        assert client.get("/api/queue", params={"limit": 10_000}).status_code == 422
        assert client.get("/api/queue", params={"limit": "1; DROP TABLE x"}).status_code == 422
        assert client.get("/api/queue", params={"min": "abc"}).status_code == 422
    assert review_rows(shared.sink, [records[0].uri]) == []


def test_page_writes_need_the_csrf_token(shared: RunningApp, records: list[Record], job: str) -> None:
    client, csrf = login(shared, "alice")
    try:
        item = client.get("/api/queue", params={"limit": 1, "job": job}).json()["items"][0]
        body = {"uri": item["uri"], "etag": item["etag"], "decision": "approve"}
        assert client.post("/api/decisions", json=body).status_code == 403
        assert client.post("/api/decisions", json=body, headers={"X-CSRF-Token": "wrong"}).status_code == 403
        assert client.post("/api/undo").status_code == 403
        assert client.post("/api/claims/release", json={"all": True}).status_code == 403
        assert review_rows(shared.sink, [item["uri"]]) == []
        assert client.post("/api/decisions", json=body, headers={"X-CSRF-Token": csrf}).status_code == 200
        assert client.post("/logout", data={"csrf": "wrong"}).status_code == 403
        assert client.post("/logout", data={"csrf": csrf}).status_code == 303
    finally:
        client.close()
    assert review_rows(shared.sink, [item["uri"]]) == [(item["uri"], item["etag"], "approve", "alice", None)]


def test_undo_takes_back_only_the_reviewers_own_last_decision(
    shared: RunningApp, records: list[Record], job: str
) -> None:
    first, second = claim(shared, "dave", job, limit=2)
    assert decide(shared, "dave", first["uri"], first["etag"], "approve").status_code == 200
    assert decide(shared, "dave", second["uri"], second["etag"], "escalate").status_code == 200
    with shared.client("dave") as dave:
        undone = dave.post("/api/undo")
        assert undone.status_code == 200
        assert undone.json()["undone"]["uri"] == second["uri"]
        assert undone.json()["item"]["uri"] == second["uri"]
    # back in the queue, and dave's again
    assert second["uri"] in {i["uri"] for i in claim(shared, "dave", job, limit=2)}
    assert [row[2] for row in review_rows(shared.sink, [first["uri"], second["uri"]])] == [
        "approve",
        "escalate",
        "undo",
    ]
    assert decide(shared, "bob", second["uri"], second["etag"]).status_code == 409


def test_a_replaced_objects_old_decision_is_stale_and_its_new_version_returns_to_the_queue(tmp_path: Path) -> None:
    """Decisions are about (uri, etag): a listing that finds a new version makes the old decision
    stale in the export and out of the counts, and puts the new version in the queue; a deleted
    object's decision is stale too."""
    made = photo_records(tmp_path / "v1", flagged=3)
    with fresh_database(admin_url()) as sink:
        write_records(sink, made)
        with review_app(sink, audit_rate=0.0, counts_refresh_s=0.2) as app:
            replaced, deleted, kept = claim(app, "alice")
            for item in (replaced, deleted, kept):
                assert decide(app, "alice", item["uri"], item["etag"], "reject").status_code == 200
            assert counts(app)["done"] == 3 and claim(app, "alice") == []
            new = made[0].model_copy(update={"etag": "v2", "processed_at": made[0].processed_at + timedelta(minutes=1)})
            write_records(sink, [new])
            prefix = replaced["uri"].rsplit("/", 1)[0] + "/"
            with PostgresSink(sink) as store, store.listing(prefix) as listing:
                listed = [ImageRef(uri=new.uri, etag="v2"), ImageRef(uri=kept["uri"], etag=kept["etag"])]
                assert list(listing.record(iter(listed))) == listed
                assert listing.finish() is not None
            again = claim(app, "alice")
            assert [(i["uri"], i["etag"]) for i in again] == [(new.uri, "v2")]
            # the counts follow at the next recount: the two stale decisions no longer count as done
            deadline = time.monotonic() + 60
            while counts(app)["done"] != 1:
                assert time.monotonic() < deadline, counts(app)
                time.sleep(0.1)
            assert counts(app)["left"] == 1
            assert decide(app, "bob", replaced["uri"], replaced["etag"], "approve").status_code == 404
        out = tmp_path / "decisions.csv"
        done = run_cli("review", "export", "--sink", sink, "--out", str(out), env={})
        assert done.returncode == 0, done.stderr
        lines = out.read_text().splitlines()
        header = lines[0].split(",")
        current = {row.split(",")[0]: row.split(",")[header.index("current")] for row in lines[1:]}
        assert current == {replaced["uri"]: "false", deleted["uri"]: "false", kept["uri"]: "true"}


# -- bands, second looks, stats ---------------------------------------------------------------------


def test_the_auto_reject_band_decides_without_a_person_and_a_share_still_goes_to_one(tmp_path: Path) -> None:
    """nsfw scores 0.99 … 0.90 with the band at 0.95: the five at or above are rejected by `auto`
    with the rule; the four below go to people. With every auto decision sampled, each auto-rejected
    item also reaches a person as a second look."""
    made = photo_records(tmp_path / "p", flagged=10)
    band = {"nsfw": 0.95}
    with fresh_database(admin_url()) as sink:
        write_records(sink, made)
        with review_app(sink, audit_rate=0.0, auto_reject=band, auto_audit_rate=0.0, second_look_rate=0.0) as app:
            people = claim(app, "alice")
            assert sorted(i["scores"]["nsfw"] for i in people) == [0.9, 0.91, 0.92, 0.93, 0.94]
            assert {i["reason"] for i in people} == {"flagged"}
            rows = review_rows(sink)
            assert sorted((uri, decision, reviewer) for uri, _, decision, reviewer, _ in rows) == sorted(
                (r.uri, "reject", "auto") for r in made[:5]
            )
            with psycopg.connect(sink) as conn:
                assert {rule for (rule,) in conn.execute("SELECT rule FROM imagemill_reviews")} == {"nsfw >= 0.95"}
            assert counts(app)["done"] == 5
    with fresh_database(admin_url()) as sink:
        write_records(sink, made)
        with review_app(sink, audit_rate=0.0, auto_reject=band, auto_audit_rate=1.0, second_look_rate=0.0) as app:
            looks = [i for i in claim(app, "alice") if i["reason"] == "second-look"]
            assert sorted(i["uri"] for i in looks) == sorted(r.uri for r in made[:5])
            first = looks[0]
            assert decide(app, "alice", first["uri"], first["etag"], "approve").json()["second_look"] is True
            with app.client("alice") as client:
                stats = client.get("/api/stats").json()
            assert {"first": "auto", "pairs": 1, "agreed": 0, "rate": 0.0} in stats["agreement"]


def test_second_looks_go_to_another_reviewer_and_agreement_is_reported(tmp_path: Path) -> None:
    with own_app(tmp_path, flagged=4, unflagged=0, second_look_rate=1.0) as app:
        items = claim(app, "alice")
        for item, decision in zip(items, ["approve", "reject", "approve", "reject"], strict=True):
            assert decide(app, "alice", item["uri"], item["etag"], decision).status_code == 200
        assert claim(app, "alice") == []  # never back to the reviewer who decided
        looks = claim(app, "bob")
        assert sorted(i["uri"] for i in looks) == sorted(i["uri"] for i in items)
        assert {i["reason"] for i in looks} == {"second-look"}
        first = {i["uri"]: d for i, d in zip(items, ["approve", "reject", "approve", "reject"], strict=True)}
        for index, look in enumerate(looks):
            second = first[look["uri"]] if index < 3 else ("approve" if first[look["uri"]] == "reject" else "reject")
            response = decide(app, "bob", look["uri"], look["etag"], second)
            assert response.status_code == 200 and response.json()["second_look"] is True
        assert claim(app, "bob") == [] and claim(app, "dave") == []
        # a second look never replaces the standing decision: the export keeps both, marked
        assert counts(app, "alice")["mine"] == 4 and counts(app, "bob")["mine"] == 0
        with app.client("carol") as client:
            stats = client.get("/api/stats").json()
            metrics = client.get("/metrics").text
        assert {"first": "people", "pairs": 4, "agreed": 3, "rate": 0.75} in stats["agreement"]
        by_name = {row["reviewer"]: row for row in stats["reviewers"]}
        assert (by_name["alice"]["standing"], by_name["alice"]["last_hour"]) == (4, 4)
        assert (by_name["bob"]["second_looks"], by_name["bob"]["last_hour"]) == (4, 4)
        assert 'imagemill_review_second_look_pairs{first="people"} 4.0' in metrics
        assert 'imagemill_review_second_look_agreed{first="people"} 3.0' in metrics
        assert 'imagemill_review_reviewer_decisions_last_hour{reviewer="bob"} 4.0' in metrics
        assert 'imagemill_review_reviewer_standing{reviewer="alice"} 4.0' in metrics


def test_counts_follow_decisions_at_once_even_when_reviewers_decide_at_the_same_moment(tmp_path: Path) -> None:
    """The tally: each decision adds its delta in its own transaction, so counts are exact however
    decisions interleave, and a recount in between loses none of them."""
    with own_app(tmp_path, flagged=16, unflagged=0, counts_refresh_s=86_400) as app:
        assert counts(app) | {"mine": 0} == {
            "left": 16,
            "left_capped": False,
            "done": 0,
            "mine": 0,
            "second_looks": 0,
            "escalated": 0,
        }
        pages = {name: claim(app, name, limit=4) for name in ("alice", "bob", "carol", "dave")}
        store = ReviewStore(app.sink, Bands(thresholds={"nsfw": 0.5}, audit_rate=0.0))

        def work(name: str) -> None:
            for n, item in enumerate(pages[name]):
                decision = "escalate" if n == 0 else "approve"
                assert decide(app, name, item["uri"], item["etag"], decision).status_code == 200
                if name == "alice":
                    store.recount()

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(work, pages))
        store.close()
        assert counts(app, "bob") == {
            "left": 0,
            "left_capped": False,
            "done": 12,
            "mine": 4,
            "second_looks": 0,
            "escalated": 4,
        }


def test_metrics_count_decisions_by_reviewer_and_outcome(shared: RunningApp, records: list[Record], job: str) -> None:
    item = claim(shared, "bob", job, limit=1)[0]
    assert decide(shared, "bob", item["uri"], item["etag"], "escalate").status_code == 200
    with shared.client("bob") as client:
        text = client.get("/metrics").text
    assert 'imagemill_review_decisions_total{decision="escalate",reviewer="bob"}' in text
    assert "imagemill_review_queue_size " in text and 'imagemill_review_waiting{kind="escalated"}' in text


def test_responses_carry_the_security_headers(shared: RunningApp) -> None:
    with shared.client() as client:
        page = client.get("/login")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"
    assert "http" not in page.text.split("<body>")[1].replace('method="post"', "")  # no outside assets


def test_tokens_never_reach_the_logs(shared: RunningApp, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("DEBUG"):
        login(shared, "alice")[0].close()
        with shared.client() as client:
            client.headers["X-Forwarded-For"] = next_address()
            wrong_login(client, "alice", TOKENS["bob"])
        with shared.client("bob") as client:
            client.get("/api/queue")
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert not any(token in text for token in TOKENS.values())


# -- proxy mode -------------------------------------------------------------------------------------


def test_proxy_mode_believes_the_header_only_from_the_configured_proxies(tmp_path: Path) -> None:
    """As Grafana's auth proxy: the reviewer named in the header, from a TCP peer inside
    IMAGEMILL_REVIEW_PROXY_ADDRESSES; roles from a groups header or the tokens file."""
    proxied = {
        "auth": "proxy",
        "proxy_addresses": "127.0.0.1/32",
        "proxy_role_header": "X-Forwarded-Groups",
        "proxy_lead_groups": "moderation-leads",
        "proxy_logout_url": "/oauth2/sign_out",
    }
    with own_app(tmp_path, flagged=2, unflagged=0, **proxied) as app, app.client() as client:
        as_erin = {"X-Forwarded-User": "erin@example.org"}
        mine = client.get("/api/queue", headers=as_erin).json()
        assert (mine["reviewer"], mine["role"], len(mine["items"])) == ("erin@example.org", "reviewer", 2)
        led = client.get("/api/queue", headers={**as_erin, "X-Forwarded-Groups": "staff, moderation-leads"}).json()
        assert led["role"] == "lead"
        assert client.get("/api/queue", headers={"X-Forwarded-User": "carol"}).json()["role"] == "lead"  # tokens file
        assert client.get("/api/queue").status_code == 401
        assert client.get("/api/queue", headers={"X-Forwarded-User": "<b>"}).status_code == 401
        # a page write needs the page's CSRF token, which the page gets from the proxy's name
        page = client.get("/", headers=as_erin)
        assert page.status_code == 200 and "erin@example.org" in page.text
        csrf = page.text.split('data-csrf="')[1].split('"')[0]
        item = mine["items"][0]
        body = {"uri": item["uri"], "etag": item["etag"], "decision": "approve"}
        assert client.post("/api/decisions", json=body, headers=as_erin).status_code == 403
        done = client.post("/api/decisions", json=body, headers={**as_erin, "X-CSRF-Token": csrf})
        assert done.status_code == 200 and done.json()["reviewer"] == "erin@example.org"
        assert client.get("/login").status_code == 303
        # Log out gives the claims back and sends the browser to the proxy's own sign-out
        assert client.post("/logout", data={"csrf": "wrong"}, headers=as_erin).status_code == 403
        out = client.post("/logout", data={"csrf": csrf}, headers=as_erin)
        assert out.status_code == 303 and out.headers["location"] == "/oauth2/sign_out"
        assert claims_of(app.sink, "erin@example.org") == set()
    # the header from anywhere else names nobody, whatever X-Forwarded-For claims
    distrusting = {**proxied, "proxy_addresses": "10.0.0.0/8", "forwarded_allow_ips": "*"}
    with own_app(tmp_path / "second", flagged=1, unflagged=0, **distrusting) as app, app.client() as client:
        spoofed = {"X-Forwarded-User": "carol", "X-Forwarded-For": "10.1.2.3"}
        assert client.get("/api/queue", headers=spoofed).status_code == 401
        assert client.get("/", headers=spoofed).status_code == 303


# -- the database away, the command line ------------------------------------------------------------


def test_the_api_answers_json_503_while_the_database_is_down(tmp_path: Path) -> None:
    with private_postgres() as server:
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE review")
        sink = server.url("review")
        write_records(sink, photo_records(tmp_path / "p", flagged=2))
        with review_app(sink, audit_rate=0.0) as app, app.client("alice") as client:
            assert client.get("/api/queue").status_code == 200
            server.stop()
            for method, path in (("GET", "/api/queue"), ("GET", "/api/counts"), ("POST", "/api/undo")):
                down = client.request(method, path)
                assert down.status_code == 503, (path, down.text)
                assert down.headers["content-type"].startswith("application/json") and down.json()["error"]
                assert down.headers["retry-after"]
            assert client.get("/healthz").status_code == 503
            server.start()
            assert client.get("/api/queue").status_code == 200


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEMILL_")}
    return subprocess.run(
        [sys.executable, "-m", "imagemill", *args],
        capture_output=True,
        text=True,
        env={**base, "COLUMNS": "200", **env},
        timeout=120,
        check=False,
    )


def test_the_server_refuses_to_start_without_long_enough_tokens(shared: RunningApp) -> None:
    sink = shared.sink
    for tokens in ({}, {"IMAGEMILL_REVIEW_TOKENS": "{}"}, {"IMAGEMILL_REVIEW_TOKENS": "/no/such/file.json"}):
        done = run_cli("review", "--sink", sink, "--port", "1", env=tokens)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "IMAGEMILL_REVIEW_TOKENS" in done.stderr
    shared_token = json.dumps({"alice": "same-token-1234567890", "bob": "same-token-1234567890"})
    done = run_cli("review", "--sink", sink, env={"IMAGEMILL_REVIEW_TOKENS": shared_token})
    assert done.returncode == 2 and "share a token" in done.stderr and "same-token" not in done.stderr
    short = json.dumps({"alice": "alice-token-0123456789", "bob": {"token": "short-12345", "role": "lead"}})
    done = run_cli("review", "--sink", sink, "--port", "1", env={"IMAGEMILL_REVIEW_TOKENS": short})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "bob" in done.stderr and "16 characters" in done.stderr and "short-12345" not in done.stderr


def test_export_writes_the_decisions_that_stand(tmp_path: Path) -> None:
    with own_app(tmp_path, flagged=3, unflagged=0, reasons=REASONS) as app:
        items = claim(app, "alice", limit=3)
        for item, decision in zip(items, ["approve", "reject", "escalate"], strict=True):
            response = decide(app, "alice", item["uri"], item["etag"], decision, note="n", reason="spam")
            assert response.status_code == 200
        with app.client("alice") as client:
            assert client.post("/api/undo").status_code == 200
        out = tmp_path / "decisions.jsonl"
        done = run_cli("review", "export", "--sink", app.sink, "--out", str(out), env={})
        assert done.returncode == 0, done.stderr
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [(r["uri"], r["decision"], r["reviewer"], r["note"], r["reason"], r["current"]) for r in rows] == [
            (items[0]["uri"], "approve", "alice", "n", "spam", True),
            (items[1]["uri"], "reject", "alice", "n", "spam", True),
        ]
        csv_out = tmp_path / "decisions.csv"
        done = run_cli("review", "export", "--all", "--sink", app.sink, "--out", str(csv_out), env={})
        assert done.returncode == 0, done.stderr
        lines = csv_out.read_text().splitlines()
        assert lines[0] == "uri,etag,decision,reviewer,role,override,second_look,reason,rule,note,decided_at,current"
        assert len(lines) == 5


def test_review_export_problems_are_one_line_exit_2(tmp_path: Path, shared: RunningApp) -> None:
    """Before: a missing folder gave a traceback."""
    (tmp_path / "taken.csv").mkdir()
    for out in (tmp_path / "missing" / "d.csv", tmp_path / "d.txt", tmp_path / "taken.csv"):
        done = run_cli("review", "export", "--sink", shared.sink, "--out", str(out), env={})
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and str(out) in done.stderr, done.stderr
    nowhere = "postgresql://postgres@127.0.0.1:1/none"
    done = run_cli("review", "export", "--sink", nowhere, "--out", str(tmp_path / "d.csv"), env={})
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not list(tmp_path.glob("*.csv.partial")) and not (tmp_path / "d.csv").exists()
