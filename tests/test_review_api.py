"""The review app's API and its security, over a real PostgreSQL database and real HTTP (uvicorn)."""

import concurrent.futures
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from PIL import Image

from imagemill.core.schemas import Record
from tests.fixtures.postgres import admin_url, fresh_database
from tests.fixtures.review import TOKENS, RunningApp, photo_records, review_app, write_records

pytestmark = pytest.mark.slow


@pytest.fixture
def sink() -> Iterator[str]:
    """A fresh database per test: the review tables are per database, so tests never share a queue."""
    with fresh_database(admin_url()) as url:
        yield url


@pytest.fixture
def records(sink: str, tmp_path: Path) -> list[Record]:
    made = photo_records(tmp_path / "photos", flagged=6, unflagged=4)
    write_records(sink, made)
    return made


@pytest.fixture
def app(sink: str, records: list[Record]) -> Iterator[RunningApp]:
    with review_app(sink, audit_rate=0.0) as running:
        yield running


def decide(app: RunningApp, reviewer: str, uri: str, etag: str, decision: str = "approve", **extra: object):
    with app.client(reviewer) as client:
        return client.post("/api/decisions", json={"uri": uri, "etag": etag, "decision": decision, **extra})


def review_rows(sink: str) -> list[tuple]:
    with psycopg.connect(sink) as conn:
        return conn.execute("SELECT uri, etag, decision, reviewer, note FROM imagemill_reviews ORDER BY id").fetchall()


def login(app: RunningApp, reviewer: str):
    """A browser-like client logged in through the form: (client, csrf token from the page)."""
    client = app.client()
    form = client.get("/login")
    nonce = form.text.split('name="nonce" value="')[1].split('"')[0]
    done = client.post("/login", data={"token": TOKENS[reviewer], "nonce": nonce, "next": "/"})
    assert done.status_code == 303 and done.headers["location"] == "/"
    cookie = done.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    page = client.get("/")
    assert page.status_code == 200
    csrf = page.text.split('data-csrf="')[1].split('"')[0]
    return client, csrf


def test_without_a_token_the_api_is_401_and_pages_lead_to_the_login_form(
    app: RunningApp, records: list[Record]
) -> None:
    with app.client() as client:
        for path in ("/api/queue", "/api/counts", "/metrics", f"/api/thumbnail?uri={records[0].uri}&etag=x"):
            response = client.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.post("/api/decisions", json={}).status_code == 401
        assert client.post("/api/undo").status_code == 401
        page = client.get("/")
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
        assert client.get("/healthz").json() == {"status": "ok"}
        login_page = client.get("/login")
        assert login_page.status_code == 200 and "Reviewer token" in login_page.text


def test_a_wrong_token_is_401_and_never_echoed(app: RunningApp) -> None:
    with app.client() as client:
        wrong = "not-a-reviewers-token-xyz"
        for header in (f"Bearer {wrong}", f"Bearer {TOKENS['alice']}x", "Basic YWxpY2U6eA==", "Bearer"):
            response = client.get("/api/queue", headers={"Authorization": header})
            assert response.status_code == 401
        form = client.get("/login")
        nonce = form.text.split('name="nonce" value="')[1].split('"')[0]
        refused = client.post("/login", data={"token": wrong, "nonce": nonce})
        assert refused.status_code == 401 and wrong not in refused.text
        assert "imagemill_review=" not in refused.headers.get("set-cookie", "")


def test_login_needs_the_forms_own_nonce(app: RunningApp) -> None:
    with app.client() as client:
        response = client.post("/login", data={"token": TOKENS["alice"], "nonce": "made-up"})
        assert response.status_code == 400
        assert "imagemill_review=" not in response.headers.get("set-cookie", "")


def test_two_reviewers_claims_never_overlap_even_at_the_same_moment(app: RunningApp, records: list[Record]) -> None:
    def claim(reviewer: str) -> set[str]:
        with app.client(reviewer) as client:
            response = client.get("/api/queue", params={"limit": 4})
            assert response.status_code == 200
            return {item["uri"] for item in response.json()["items"]}

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        alice, bob = pool.map(claim, ["alice", "bob"])
    assert alice and bob and not alice & bob
    assert alice | bob == {r.uri for r in records if r.moderation and r.moderation.flagged}
    # asking again gives each their own claims back, renewed, never the other's
    assert claim("alice") == alice and claim("bob") == bob


def test_an_item_carries_what_the_reviewer_needs(app: RunningApp, records: list[Record]) -> None:
    with app.client("alice") as client:
        body = client.get("/api/queue", params={"limit": 1}).json()
    (item,) = body["items"]
    first = records[0]
    assert item["uri"] == first.uri and item["etag"] == first.etag and item["job_id"] == "job-1"
    assert item["flagged"] is True and item["reason"] == "flagged"
    assert item["scores"] == {"nsfw": 0.99, "normal": 0.01}
    assert item["caption"] == "a test photo number 0"
    assert [tag["tag"] for tag in item["tags"]] == ["landscape", "sky"]
    assert item["thumbnail_url"].startswith("/api/thumbnail?uri=")
    assert body["lease_s"] == 300


def test_a_decision_is_stored_and_leaves_the_queue(app: RunningApp, sink: str) -> None:
    with app.client("alice") as client:
        item = client.get("/api/queue", params={"limit": 1}).json()["items"][0]
        left = client.get("/api/counts").json()["left"]
        response = decide(app, "alice", item["uri"], item["etag"], "reject", note="clearly not ok")
        assert response.status_code == 200
        assert response.json()["decision"] == "reject" and response.json()["reviewer"] == "alice"
        assert review_rows(sink) == [(item["uri"], item["etag"], "reject", "alice", "clearly not ok")]
        assert client.get("/api/counts").json() == {"left": left - 1, "done": 1, "mine": 1}
        again = client.get("/api/queue", params={"limit": 50}).json()["items"]
    assert item["uri"] not in {i["uri"] for i in again}
    with app.client("bob") as client:
        assert item["uri"] not in {i["uri"] for i in client.get("/api/queue", params={"limit": 50}).json()["items"]}


def test_a_decision_on_another_reviewers_claim_is_409_and_an_unknown_item_404(app: RunningApp, sink: str) -> None:
    with app.client("alice") as client:
        item = client.get("/api/queue", params={"limit": 1}).json()["items"][0]
    assert decide(app, "bob", item["uri"], item["etag"]).status_code == 409
    assert decide(app, "bob", "file:///nowhere/x.jpg", "e").status_code == 404
    assert decide(app, "bob", item["uri"], "another-etag").status_code == 404
    assert review_rows(sink) == []
    assert decide(app, "alice", item["uri"], item["etag"]).status_code == 200


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
        "long-note",
    ],
)
def test_a_malformed_decision_is_422_with_a_message(app: RunningApp, sink: str, body: bytes) -> None:
    with app.client("alice") as client:
        response = client.post("/api/decisions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]
    assert review_rows(sink) == []


def test_an_oversized_body_is_refused_unread(app: RunningApp, sink: str, records: list[Record]) -> None:
    huge = json.dumps({"uri": records[0].uri, "etag": records[0].etag, "decision": "approve", "note": "x" * 100_000})
    with app.client("alice") as client:
        assert client.post("/api/decisions", content=huge).status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: the size is counted as it streams
            for _ in range(100):
                yield b"x" * 1024

        assert client.post("/api/decisions", content=chunks()).status_code == 413
        assert client.get("/api/queue", params={"limit": 10_000}).status_code == 422
        assert client.get("/api/queue", params={"limit": "1; DROP TABLE x"}).status_code == 422
        assert client.get("/api/queue", params={"min": "abc"}).status_code == 422
    assert review_rows(sink) == []


def test_page_writes_need_the_csrf_token(app: RunningApp, sink: str) -> None:
    client, csrf = login(app, "alice")
    try:
        item = client.get("/api/queue", params={"limit": 1}).json()["items"][0]
        body = {"uri": item["uri"], "etag": item["etag"], "decision": "approve"}
        assert client.post("/api/decisions", json=body).status_code == 403
        assert client.post("/api/decisions", json=body, headers={"X-CSRF-Token": "wrong"}).status_code == 403
        assert client.post("/api/undo").status_code == 403
        assert review_rows(sink) == []
        assert client.post("/api/decisions", json=body, headers={"X-CSRF-Token": csrf}).status_code == 200
        assert client.post("/logout", data={"csrf": "wrong"}).status_code == 403
        assert client.post("/logout", data={"csrf": csrf}).status_code == 303
    finally:
        client.close()
    assert review_rows(sink) == [(item["uri"], item["etag"], "approve", "alice", None)]


def test_undo_takes_back_only_the_reviewers_own_last_decision(app: RunningApp, sink: str) -> None:
    with app.client("alice") as alice:
        first, second = alice.get("/api/queue", params={"limit": 2}).json()["items"]
        assert decide(app, "alice", first["uri"], first["etag"], "approve").status_code == 200
        assert decide(app, "alice", second["uri"], second["etag"], "escalate").status_code == 200
        with app.client("bob") as bob:
            assert bob.post("/api/undo").status_code == 404  # bob decided nothing
        undone = alice.post("/api/undo")
        assert undone.status_code == 200
        assert undone.json()["undone"]["uri"] == second["uri"]
        assert undone.json()["item"]["uri"] == second["uri"]
        # back in the queue, and alice's again
        assert second["uri"] in {i["uri"] for i in alice.get("/api/queue", params={"limit": 2}).json()["items"]}
        assert alice.get("/api/counts").json()["done"] == 1
    assert [row[2] for row in review_rows(sink)] == ["approve", "escalate", "undo"]
    assert decide(app, "bob", second["uri"], second["etag"]).status_code == 409


def test_thumbnails_only_for_records_in_the_store(app: RunningApp, records: list[Record], tmp_path: Path) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((tmp_path / "photos" / "photo_0000.jpg").read_bytes())
    photo_dir = records[0].uri.rsplit("/", 1)[0]
    with app.client("alice") as client:
        item = client.get("/api/queue", params={"limit": 1}).json()["items"][0]
        response = client.get(item["thumbnail_url"])
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        assert "private" in response.headers["cache-control"]
        assert max(Image.open(io.BytesIO(response.content)).size) <= 512
        assert client.get(item["thumbnail_url"], headers={"If-None-Match": response.headers["etag"]}).status_code == 304
        for uri, etag in [
            (outside.as_uri(), records[0].etag),  # an image on disk, but no record
            ("file:///etc/passwd", ""),
            (f"{photo_dir}/../photos/photo_0000.jpg", records[0].etag),
            (f"{photo_dir}/%2e%2e/photos/photo_0000.jpg", records[0].etag),
            ("s3://bucket/key.jpg", ""),
            ("http://169.254.169.254/latest/meta-data", ""),
            (records[0].uri, "another-etag"),
        ]:
            refused = client.get("/api/thumbnail", params={"uri": uri, "etag": etag})
            assert refused.status_code == 404, uri
            assert refused.headers["content-type"].startswith("application/json")


def test_a_lease_that_expires_returns_the_item_to_the_queue(sink: str, records: list[Record]) -> None:
    with review_app(sink, audit_rate=0.0, lease_s=5) as app:
        with app.client("alice") as alice:
            mine = {i["uri"] for i in alice.get("/api/queue", params={"limit": 50}).json()["items"]}
        assert len(mine) == 6
        with app.client("bob") as bob:
            assert bob.get("/api/queue", params={"limit": 50}).json()["items"] == []
            time.sleep(5.5)
            theirs = {i["uri"] for i in bob.get("/api/queue", params={"limit": 50}).json()["items"]}
            assert theirs == mine
            metrics = bob.get("/metrics").text
        assert "imagemill_review_lease_expiries_total 6.0" in metrics
        # alice's lease is gone: her decision on bob's item is refused
        first = sorted(mine)[0]
        etag = next(r.etag for r in records if r.uri == first)
        assert decide(app, "alice", first, etag or "").status_code == 409


def test_the_audit_sample_is_chosen_by_the_uri(sink: str, tmp_path: Path) -> None:
    made = photo_records(tmp_path / "photos", flagged=0, unflagged=40)
    write_records(sink, made)
    rate = 0.5
    expected = {r.uri for r in made if int(hashlib.md5(r.uri.encode()).hexdigest()[:8], 16) < rate * 2**32}
    assert 0 < len(expected) < 40
    for _ in range(2):  # the same sample every time
        with review_app(sink, audit_rate=rate) as app, app.client("alice") as client:
            items = client.get("/api/queue", params={"limit": 100}).json()["items"]
        assert {i["uri"] for i in items} == expected
        assert {i["reason"] for i in items} == {"audit"}


def test_filters_by_job_label_and_score(sink: str, tmp_path: Path) -> None:
    write_records(sink, photo_records(tmp_path / "a", flagged=5, job_id="job-a"))
    write_records(sink, photo_records(tmp_path / "b", flagged=3, job_id="job-b"))
    with review_app(sink, audit_rate=0.0) as app, app.client("alice") as client:

        def uris(**params: object) -> list[str]:
            response = client.get("/api/queue", params={"limit": 100, **params})
            assert response.status_code == 200
            return [i["uri"] for i in response.json()["items"]]

        assert len(uris(job="job-b")) == 3
        assert all("/b/" in uri for uri in uris(job="job-b"))
        # nsfw scores are 0.99, 0.98, ... per job
        assert len(uris(job="job-a", label="nsfw", min=0.975)) == 2
        assert len(uris(label="nsfw", max=0.965)) == 2
        assert len(uris(min=0.985)) == 2  # the top score, whichever label
        assert uris(label="no-such-label") == []
        assert client.get("/api/counts", params={"job": "job-a"}).json()["left"] == 5


def test_keyset_pages_continue_after_the_last_uri(sink: str, tmp_path: Path) -> None:
    write_records(sink, photo_records(tmp_path / "p", flagged=7))
    with review_app(sink, audit_rate=0.0) as app, app.client("alice") as client:
        first = client.get("/api/queue", params={"limit": 4}).json()
        assert first["next_after"] == first["items"][-1]["uri"]
        second = client.get("/api/queue", params={"limit": 4, "after": first["next_after"]}).json()
        assert [i["uri"] for i in second["items"]] == sorted(i["uri"] for i in second["items"])
        assert len(second["items"]) == 3 and second["next_after"] is None
        assert not {i["uri"] for i in first["items"]} & {i["uri"] for i in second["items"]}


def test_metrics_count_decisions_by_reviewer_and_outcome(app: RunningApp) -> None:
    with app.client("bob") as client:
        item = client.get("/api/queue", params={"limit": 1}).json()["items"][0]
        assert decide(app, "bob", item["uri"], item["etag"], "escalate").status_code == 200
        text = client.get("/metrics").text
    assert 'imagemill_review_decisions_total{decision="escalate",reviewer="bob"} 1.0' in text
    assert "imagemill_review_queue_size 5.0" in text


def test_responses_carry_the_security_headers(app: RunningApp) -> None:
    with app.client() as client:
        page = client.get("/login")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"
    assert "http" not in page.text.split("<body>")[1].replace('method="post"', "")  # no outside assets


def test_tokens_never_reach_the_logs(app: RunningApp, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("DEBUG"):
        login(app, "alice")[0].close()
        with app.client("bob") as client:
            client.get("/api/queue")
    text = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert not any(token in text for token in TOKENS.values())


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


def test_the_server_refuses_to_start_without_tokens(sink: str) -> None:
    for tokens in ({}, {"IMAGEMILL_REVIEW_TOKENS": "{}"}, {"IMAGEMILL_REVIEW_TOKENS": "/no/such/file.json"}):
        done = run_cli("review", "--sink", sink, "--port", "1", env=tokens)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "IMAGEMILL_REVIEW_TOKENS" in done.stderr
    shared = json.dumps({"alice": "same-token-123", "bob": "same-token-123"})
    done = run_cli("review", "--sink", sink, env={"IMAGEMILL_REVIEW_TOKENS": shared})
    assert done.returncode == 2 and "share a token" in done.stderr and "same-token-123" not in done.stderr


def test_export_writes_the_decisions_that_stand(app: RunningApp, sink: str, tmp_path: Path) -> None:
    with app.client("alice") as client:
        items = client.get("/api/queue", params={"limit": 3}).json()["items"]
        for item, decision in zip(items, ["approve", "reject", "escalate"], strict=True):
            assert decide(app, "alice", item["uri"], item["etag"], decision).status_code == 200
        assert client.post("/api/undo").status_code == 200
    out = tmp_path / "decisions.jsonl"
    done = run_cli("review", "export", "--sink", sink, "--out", str(out), env={})
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["uri"], r["decision"], r["reviewer"]) for r in rows] == [
        (items[0]["uri"], "approve", "alice"),
        (items[1]["uri"], "reject", "alice"),
    ]
    csv_out = tmp_path / "decisions.csv"
    done = run_cli("review", "export", "--all", "--sink", sink, "--out", str(csv_out), env={})
    assert done.returncode == 0, done.stderr
    lines = csv_out.read_text().splitlines()
    assert lines[0] == "uri,etag,decision,reviewer,note,decided_at" and len(lines) == 5
    assert run_cli("review", "export", "--sink", sink, "--out", str(tmp_path / "d.txt"), env={}).returncode == 2
