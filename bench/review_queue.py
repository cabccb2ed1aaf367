"""The review queue's queries on a large store: `python -m bench.review_queue --flagged 100000 --out bench/results`.

A fresh PostgreSQL database (the test suite's server) gets `--flagged` flagged records and as many
unflagged ones (written with SQL, in the records table's own schema), a tenth of the flagged ones
decided, then the app's own queries are timed through `ReviewStore`, as `GET /api/queue` and the
page run them: claiming a page (`claim`, 24 items, reviewers taking turns, so claims pile up as in
use), a page claimed under filters (job, label and score), a keyset page deep in the queue (`after`),
and the counts the page shows. The report gives p50, p95 and max per query, and the query plan of
the claim's candidate query. Not a test: it judges the machine it ran on.
"""

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from imagemill.core.stores.postgres import PostgresStore, current_view
from imagemill.review.store import Filters, ReviewStore
from tests.fixtures.postgres import admin_url, fresh_database

TARGET_P95_MS = 50.0


def fill(url: str, flagged: int) -> None:
    """`flagged` flagged and as many unflagged records, 3 jobs, nsfw scores spread over (0.5, 1]."""
    PostgresStore(url).check()  # the table and view, by the store's own code
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO imagemill_records (uri, etag, signature, job_id, flagged, caption, processed_at, record)"
            " SELECT 's3://bench/img/' || lpad(i::text, 8, '0') || '.jpg', md5(i::text), 'sig', 'job-' || (i %% 3),"
            " i <= %(flagged)s, 'a caption', now(),"
            " jsonb_build_object('moderation', jsonb_build_object('flagged', i <= %(flagged)s, 'model', 'm',"
            "   'scores', jsonb_build_object('nsfw',"
            "     CASE WHEN i <= %(flagged)s THEN 0.5 + (i %% 500) / 1000.0 ELSE 0.01 END, 'normal', 0.1)),"
            "  'tags', jsonb_build_object('model', 'm',"
            "     'labels', jsonb_build_array(jsonb_build_object('tag', 'sky', 'score', 0.3))))"
            " FROM generate_series(1, %(total)s) AS i",
            {"flagged": flagged, "total": 2 * flagged},
        )
    store = ReviewStore(url)
    store.setup()
    store.close()
    with psycopg.connect(url, autocommit=True) as conn:
        # a tenth of the flagged ones already decided
        conn.execute(
            "INSERT INTO imagemill_reviews (uri, etag, decision, reviewer)"
            " SELECT uri, etag, 'approve', 'bench' FROM imagemill_records WHERE flagged AND random() < 0.1"
        )
        conn.execute("VACUUM ANALYZE")


def analyze(url: str) -> None:
    """What autovacuum does within a minute (the app sets the claims table to be analyzed every 100
    changed rows); the benchmark claims thousands of items in seconds, faster than its naptime."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE imagemill_review_claims")


def timed(action: Callable[[], Any], repeats: int) -> dict[str, float]:
    times = []
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


def run(flagged: int, repeats: int) -> dict[str, Any]:
    with fresh_database(admin_url()) as url:
        started = time.perf_counter()
        fill(url, flagged)
        fill_s = time.perf_counter() - started
        store = ReviewStore(url, audit_rate=0.01)
        store.ping()  # a warm connection, as a running app has
        turn = iter(range(10**9))
        middle = f"s3://bench/img/{flagged // 2:08d}.jpg"
        results = {"claim 24": timed(lambda: store.claim(f"reviewer-{next(turn) % 20}", 24), repeats)}
        analyze(url)
        results |= {
            "claim 24, job + label + score": timed(
                lambda: store.claim(
                    f"reviewer-{next(turn) % 20}", 24, Filters(job_id="job-1", label="nsfw", min_score=0.9)
                ),
                repeats,
            ),
            "claim 24 after a keyset cursor": timed(
                lambda: store.claim(f"r-{next(turn) % 20}", 24, after=middle), repeats
            ),
            "counts (left, done, mine)": timed(lambda: store.counts("reviewer-1"), max(repeats // 4, 5)),
        }
        with psycopg.connect(url) as conn:
            left = conn.execute(f"SELECT count(*) FROM {current_view('imagemill_records')} WHERE flagged").fetchone()
        plan_query = (
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT r.uri FROM imagemill_current AS r WHERE r.error_kind IS NULL"
            " AND r.flagged"
            " AND coalesce((SELECT d.decision FROM imagemill_reviews AS d WHERE d.uri = r.uri AND d.etag = r.etag"
            " ORDER BY d.id DESC LIMIT 1), 'undo') = 'undo'"
            " AND NOT EXISTS (SELECT 1 FROM imagemill_review_claims AS c WHERE c.uri = r.uri AND c.etag = r.etag"
            " AND c.expires_at > now() AND c.reviewer <> 'x') ORDER BY r.uri, r.etag LIMIT 24"
        )
        with psycopg.connect(url) as conn:
            plan = [row[0] for row in conn.execute(plan_query).fetchall()]
        store.close()
    return {
        "flagged": flagged,
        "unflagged": flagged,
        "flagged_rows_seen": int(left[0]) if left else 0,
        "fill_s": round(fill_s, 1),
        "queries": results,
        "target_p95_ms": TARGET_P95_MS,
        "plan": plan,
    }


def report(result: dict[str, Any], out: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    (out / f"{stamp}-review-queue.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Review queue on {result['flagged']:,} flagged + {result['unflagged']:,} unflagged records",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {result['machine']['platform']}. A tenth of the flagged ones"
        " decided beforehand; audit rate 0.01; reviewers take turns, so claims pile up as they run.",
        "",
        "| query | p50 ms | p95 ms | max ms | runs | p95 target |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, numbers in result["queries"].items():
        target = f"< {TARGET_P95_MS:.0f} ms" if name.startswith("claim") else "–"
        cells = [name, numbers["p50_ms"], numbers["p95_ms"], numbers["max_ms"], numbers["repeats"], target]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    lines += [
        "",
        "The claim's candidate query, its flagged half (plan, EXPLAIN ANALYZE):",
        "",
        "```",
        *result["plan"],
        "```",
        "",
    ]
    path = out / f"{stamp}-review-queue.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--flagged", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    result = run(args.flagged, args.repeats)
    print(report(result, args.out).read_text())


if __name__ == "__main__":
    main()
