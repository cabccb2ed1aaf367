"""The review queue on a large store: `python -m bench.scale.review_queue --flagged 1000000 --out bench/results`.

A fresh PostgreSQL database (the test suite's server) gets `--flagged` flagged records and as many
unflagged ones, seeded with COPY in the records table's own schema: three jobs, two thresholded
labels (`nsfw` at 0.5, `violence` at 0.6), scores spread over the band. The highest-scored tenth of
the flagged ones is decided beforehand (reviewers work from the top, so that is where decisions
pile up), then the app is built as `imagemill review` builds it and timed: claiming a page
(`claim`, 24 items, reviewers taking turns, so claims pile up as in use) sorted by score and by
age, under filters (job + label + score), after a keyset cursor, renewing a page's claims, the
counts the page shows (plain and filtered), one decision, and the page itself (`GET /` over HTTP
with a session: claim, counts and the HTML). The report gives p50, p95 and max per query, and the
plans of the claim's flagged half. Not a test: it judges the machine it ran on.
"""

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from bench.report import save_results
from imagemill.core.settings import Settings
from imagemill.core.sinks.postgres import PostgresSink
from imagemill.review.settings import Reviewer
from imagemill.review.store import Bands, Decision, Filters, ReviewStore, Sort
from tests.fixtures.postgres import admin_url, fresh_database
from tests.fixtures.review import TOKENS, review_app

TARGET_P95_MS = 50.0
TARGET_PAGE_P95_MS = 300.0
THRESHOLDS = {"nsfw": 0.5, "violence": 0.6}
COPY_ROWS = 50_000
# the report's table: which rows have a target
TARGETS = {
    "claim 24": TARGET_P95_MS,
    "claim 24, job + label + score": TARGET_P95_MS,
    "counts (left, done, mine)": TARGET_P95_MS,
    "counts, job + label + score": TARGET_P95_MS,
    "page load (GET /)": TARGET_PAGE_P95_MS,
}


def _rows(start: int, stop: int, flagged: int) -> str:
    """COPY text of records `start`..`stop`: the first `flagged` are flagged, scores spread (not two alike)."""
    out = io.StringIO()
    for i in range(start, stop):
        is_flagged = i <= flagged
        if is_flagged:
            nsfw = 0.5 + ((i * 7919) % 500_000) / 1_000_000
            violence = 0.6 + ((i * 104_729) % 400_000) / 1_000_000 if i % 3 == 0 else 0.1
        else:
            nsfw, violence = ((i * 7919) % 490_000) / 1_000_000, 0.05
        record = json.dumps(
            {
                "moderation": {"flagged": is_flagged, "model": "m", "scores": {"nsfw": nsfw, "violence": violence}},
                "tags": {"model": "m", "labels": [{"tag": "sky", "score": 0.3}]},
            }
        )
        flag = "t" if is_flagged else "f"
        # written_at spread over a day, so sorting by age is a real order
        out.write(
            f"s3://bench/img/{i:08d}.jpg\t{i:x}\tsig\tjob-{i % 3}\t{flag}\ta caption\t2026-01-01 00:00:00+00"
            f"\t{record.replace(chr(92), chr(92) * 2)}\t2026-01-01 00:00:00+00\n"
        )
    return out.getvalue()


def fill(url: str, flagged: int) -> None:
    """`flagged` flagged and as many unflagged records (COPY), the top tenth of the flagged decided."""
    PostgresSink(url).check()  # the table and view, by the store's own code
    total = 2 * flagged
    with psycopg.connect(url, autocommit=True) as conn:
        for start in range(1, total + 1, COPY_ROWS):
            with (
                conn.cursor() as cur,
                cur.copy(
                    "COPY imagemill_records (uri, etag, signature, job_id, flagged, caption, processed_at, record,"
                    " written_at) FROM STDIN"
                ) as copy,
            ):
                copy.write(_rows(start, min(start + COPY_ROWS, total + 1), flagged))
        conn.execute(
            "UPDATE imagemill_records SET written_at = written_at + make_interval(secs => (hashtext(uri) & 65535))"
        )
        conn.execute("VACUUM ANALYZE imagemill_records")


def decide_top(url: str, flagged: int) -> None:
    """The highest-scored tenth of the flagged items decided, as people working from the top leave them."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "WITH top AS (SELECT uri, etag FROM imagemill_records WHERE flagged ORDER BY greatest("
            "(record -> 'moderation' -> 'scores' ->> 'nsfw')::float8,"
            " (record -> 'moderation' -> 'scores' ->> 'violence')::float8)"
            " DESC LIMIT %s), done AS (INSERT INTO imagemill_reviews (uri, etag, decision, reviewer)"
            " SELECT uri, etag, 'approve', 'reviewer-' || (hashtext(uri) & 7) FROM top RETURNING uri, etag)"
            " UPDATE imagemill_records AS r SET review_state = 'decided' FROM done"
            " WHERE r.uri = done.uri AND r.etag = done.etag",
            (flagged // 10,),
        )
        conn.execute("VACUUM ANALYZE")


def timed(action: Callable[[], Any], repeats: int) -> dict[str, float]:
    times = []
    action()  # a warm-up: the first call pays for the plan cache and cold pages
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 2),
        "p95_ms": round(times[max(0, int(len(times) * 0.95) - 1)], 2),
        "max_ms": round(times[-1], 2),
        "repeats": repeats,
    }


def explain(url: str, store: ReviewStore, filters: Filters) -> list[str]:
    """EXPLAIN ANALYZE of the claim's candidate query, as the store sends it."""
    query, params = store.candidate_query("planner", 24, filters)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET jit = off")
        statement = sql.SQL("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {}").format(query)
        return [row[0] for row in conn.execute(statement, params, prepare=False)]


def run(flagged: int, repeats: int) -> dict[str, Any]:
    core = Settings(moderation_thresholds=THRESHOLDS)
    with fresh_database(admin_url()) as url:
        started = time.perf_counter()
        fill(url, flagged)
        fill_s = time.perf_counter() - started
        started = time.perf_counter()
        # the app as `imagemill review` builds it: the queue's indexes, the first count
        with review_app(url, core=core, audit_rate=0.01, counts_refresh_s=86_400) as app:
            setup_s = time.perf_counter() - started
            decide_top(url, flagged)
            store = ReviewStore(url, Bands(thresholds=THRESHOLDS, audit_rate=0.01))
            started = time.perf_counter()
            store.recount()
            recount_s = time.perf_counter() - started
            store.ping()  # a warm connection, as a running app has
            turn = iter(range(10**9))

            def reviewer() -> Reviewer:
                return Reviewer(f"reviewer-{next(turn) % 20}")

            filtered = Filters(job_id="job-1", label="nsfw", min_score=0.9)
            results = {"claim 24": timed(lambda: store.claim(reviewer(), 24), repeats)}
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("ANALYZE imagemill_review_claims")  # what autovacuum does within a minute
            middle = store.claim(Reviewer("deep"), 24, after=store.claim(Reviewer("peek"), 1).items[0].cursor)
            deep = store.claim(Reviewer("deeper"), 1, after=middle.next_after or "").items
            page = store.claim(Reviewer("renewer"), 24)
            keys = [(item.uri, item.etag) for item in page.items]
            results |= {
                "claim 24, job + label + score": timed(lambda: store.claim(reviewer(), 24, filtered), repeats),
                "claim 24, oldest first": timed(lambda: store.claim(reviewer(), 24, sort=Sort.AGE), repeats),
                "claim 24 after a keyset cursor": timed(
                    lambda: store.claim(reviewer(), 24, after=deep[0].cursor if deep else ""), repeats
                ),
                "renew a page's 24 claims": timed(lambda: store.renew("renewer", keys), repeats),
                "counts (left, done, mine)": timed(lambda: store.counts("reviewer-1"), repeats),
                "counts, job + label + score": timed(lambda: store.counts("reviewer-1", filtered), repeats),
            }
            decided = iter(store.claim(Reviewer("decider"), 200).items)
            results["decide one item"] = timed(
                lambda: store.decide(Reviewer("decider"), *_key(next(decided)), Decision.APPROVE), min(repeats, 150)
            )
            results["page load (GET /)"] = timed(_page(app.url), max(repeats // 2, 20))
            plan = explain(url, store, Filters())
            plan_filtered = explain(url, store, filtered)
            with psycopg.connect(url) as conn:
                counted = conn.execute(
                    "SELECT count(*) FILTER (WHERE flagged), count(*) FILTER (WHERE review_state IS NOT NULL)"
                    " FROM imagemill_records"
                ).fetchone()
            store.close()
    return {
        "flagged": flagged,
        "unflagged": flagged,
        "flagged_rows_seen": int(counted[0]) if counted else 0,
        "decided_rows_seen": int(counted[1]) if counted else 0,
        "fill_s": round(fill_s, 1),
        "app_setup_s": round(setup_s, 1),
        "recount_s": round(recount_s, 1),
        "queries": results,
        "plan": plan,
        "plan_filtered": plan_filtered,
    }


def _key(item: Any) -> tuple[str, str]:
    return item.uri, item.etag


def _page(url: str) -> Callable[[], None]:
    """GET / as a logged-in browser does (a session cookie); a reviewer of its own, so the page claims anew."""
    client = httpx.Client(base_url=url, timeout=60, follow_redirects=False)
    form = client.get("/login").text
    nonce = form.split('name="nonce" value="')[1].split('"')[0]
    done = client.post("/login", data={"reviewer": "alice", "token": TOKENS["alice"], "nonce": nonce})
    assert done.status_code == 303, done.text

    def load() -> None:
        response = client.get("/")
        assert response.status_code == 200, response.text[:200]

    return load


def report(result: dict[str, Any], out: Path, command: str) -> Path:
    result["machine"] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_end": [round(load, 2) for load in os.getloadavg()],
    }
    result["command"] = command
    lines = [
        f"# Review queue on {result['flagged']:,} flagged + {result['unflagged']:,} unflagged records",
        "",
        f"`{command}`",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {result['machine']['platform']}, {result['machine']['cpus']} CPUs"
        f" shared with other work (load average {result['machine']['load_average_at_end']} at the end). Thresholds"
        f" {json.dumps(THRESHOLDS)}; the highest-scored tenth of the flagged items decided beforehand"
        f" ({result['decided_rows_seen']:,} rows); audit rate 0.01; reviewers take turns, so claims pile up as"
        f" they run. Seeding took {result['fill_s']} s (COPY), building the app (the queue's indexes, the first"
        f" count) {result['app_setup_s']} s, a full recount {result['recount_s']} s (in the background, every"
        " `IMAGEMILL_REVIEW_COUNTS_REFRESH_S`, 300 s by default).",
        "",
        "| query | p50 ms | p95 ms | max ms | runs | p95 target |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, numbers in result["queries"].items():
        target = f"< {TARGETS[name]:.0f} ms" if name in TARGETS else "–"
        cells = [name, numbers["p50_ms"], numbers["p95_ms"], numbers["max_ms"], numbers["repeats"], target]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    for title, key in (("plain", "plan"), ("job + label + score", "plan_filtered")):
        lines += [
            "",
            f"The claim's candidate query ({title}), EXPLAIN ANALYZE:",
            "",
            "```",
            *result[key],
            "```",
        ]
    lines.append("")
    return save_results(out, "review-queue", result, "\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--flagged", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    command = f"python -m bench.scale.review_queue --flagged {args.flagged} --repeats {args.repeats} --out {args.out}"
    result = run(args.flagged, args.repeats)
    print(report(result, args.out, command).read_text())


if __name__ == "__main__":
    main()
