"""Marking deletions after a complete listing: 1,000,000 listed objects through `PostgresListing`.

    python -m bench.scale.current --objects 1000000 --out bench/results

A fresh database gets a records table holding the prefix's objects (filled by the server, not
timed): `--objects` of them listed again, 1 % of those with a new etag (replaced), and 1 % more
that the listing no longer has (deleted), plus as many rows again under another prefix that the
listing must leave alone. Then, timed in this process:

- *listing*: the listing's `ImageRef`s built and iterated alone (what any listing costs), then
  the same through `PostgresListing.record` (every pair COPYed into a temporary table in batches);
  the difference is what recording costs;
- *marking*: `finish()`, the UPDATEs in the database, first with the changes above, then again
  for an unchanged bucket (the common scheduled scan);
- the Python process's RSS sampled every 20 ms throughout (and its VmHWM);
- a few queries on the view.
"""

import argparse
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from bench.machine import describe, loadavg
from bench.memory import MIB, Sampler, peak_rss, rss
from bench.report import save_results
from imagemill.core.schemas import ImageRef
from imagemill.core.sinks.postgres import PostgresSink
from tests.fixtures.postgres import admin_url, fresh_database

PREFIX = "s3://bench/photos/"
OTHER = "s3://bench/other/"


def listing(objects: int) -> Iterator[ImageRef]:
    """What S3 would list: `objects` keys, the first 1 % replaced since the table was written."""
    replaced = objects // 100
    for n in range(objects):
        yield ImageRef(uri=f"{PREFIX}{n:08d}.jpg", etag="e2" if n < replaced else "e1", size=1000)


def fill(url: str, objects: int) -> None:
    """The table as the previous scans left it; filled by the server."""
    record = '{"tags": [], "caption": {"text": "a photo", "model": "m"}}'
    with PostgresSink(url) as store, psycopg.connect(url, autocommit=True) as conn:
        store.check()  # creates the table, its indexes and the view
        insert = (
            "INSERT INTO imagemill_records (uri, etag, signature, job_id, flagged, caption, processed_at, record)"
            " SELECT %s || lpad(n::text, 8, '0') || '.jpg', 'e1', 'sig', 'job', n %% 100 = 7, 'a photo',"
            " now() - interval '1 day', %s::jsonb FROM generate_series(0, %s) AS n"
        )
        conn.execute(insert, (PREFIX, record, objects + objects // 100 - 1))  # the last 1 % are deleted
        conn.execute(insert, (OTHER, record, objects - 1))
        conn.execute("VACUUM ANALYZE imagemill_records")


def timed_listing(store: PostgresSink, objects: int, record: bool) -> dict[str, Any]:
    with Sampler(tree=False) as sampler:
        start = time.perf_counter()
        if record:
            with store.listing(PREFIX) as seen:
                count = sum(1 for _ in seen.record(listing(objects)))
                listed_s = time.perf_counter() - start
                mark_start = time.perf_counter()
                marks = seen.finish()
                mark_s = time.perf_counter() - mark_start
        else:
            count = sum(1 for _ in listing(objects))
            listed_s, mark_s, marks = time.perf_counter() - start, 0.0, None
    return {
        "listed": count,
        "listing_s": round(listed_s, 2),
        "marking_s": round(mark_s, 2),
        "marks": marks.__dict__ if marks else None,
        "peak_rss_mib": round(sampler.peak / MIB, 1),
    }


def view_queries(url: str, objects: int) -> dict[str, float]:
    queries = {
        "count(*) of the view": "SELECT count(*) FROM imagemill_current",
        "SELECT uri, caption … WHERE flagged": "SELECT uri, caption FROM imagemill_current WHERE flagged",
        "one uri": f"SELECT * FROM imagemill_current WHERE uri = '{PREFIX}{objects // 2:08d}.jpg'",
    }
    timings = {}
    with psycopg.connect(url) as conn:
        for name, query in queries.items():
            start = time.perf_counter()
            rows = conn.execute(query).fetchall()
            timings[name] = round(time.perf_counter() - start, 3)
            timings[name + " rows"] = len(rows) if len(rows) != 1 else rows[0][0] if name.startswith("count") else 1
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale.current", description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    objects: int = args.objects
    result: dict[str, Any] = {"objects": objects, "machine": describe(), "loadavg_start": loadavg()}
    with fresh_database(admin_url()) as url:
        start = time.perf_counter()
        fill(url, objects)
        result["fill_s"] = round(time.perf_counter() - start, 1)
        result["rss_before_mib"] = round((rss(os.getpid()) or 0) / MIB, 1)
        with PostgresSink(url) as store:
            result["iterate_only"] = timed_listing(store, objects, record=False)
            result["changed"] = timed_listing(store, objects, record=True)
            result["unchanged"] = timed_listing(store, objects, record=True)
        result["view"] = view_queries(url, objects)
    result["vmhwm_mib"] = round((peak_rss(os.getpid()) or 0) / MIB, 1)
    result["loadavg_end"] = loadavg()
    text = report(result)
    save_results(args.out, "current", result, text)
    print(text)


def report(r: dict[str, Any]) -> str:
    n = r["objects"]
    only, changed, unchanged = r["iterate_only"], r["changed"], r["unchanged"]
    machine = r["machine"]
    lines = [
        f"# imagemill benchmark — marking deletions after a listing of {n:,} objects",
        "",
        f"`python -m bench.scale.current --objects {n}`",
        "",
        f"Machine: {machine.get('cpus')} CPUs, commit {machine.get('commit')}; PostgreSQL on the same machine."
        f" Load average {r['loadavg_start']} at the start, {r['loadavg_end']} at the end.",
        "",
        f"Table: {n + n // 100:,} rows under the listed prefix ({n // 100:,} of them no longer listed, {n // 100:,}"
        f" listed with a new etag) and {n:,} under another prefix; filled by the server in {r['fill_s']} s (not"
        " timed).",
        "",
        "| step | s | peak RSS (MiB) | marks |",
        "| --- | ---: | ---: | --- |",
        f"| build and iterate {n:,} `ImageRef`s alone | {only['listing_s']} | {only['peak_rss_mib']} | – |",
        f"| the same through `PostgresListing.record` (COPY) | {changed['listing_s']} |"
        f" {changed['peak_rss_mib']} | – |",
        f"| `finish()`: marking in the database, 1 % deleted, 1 % replaced | {changed['marking_s']} | – |"
        f" {changed['marks']} |",
        f"| again, unchanged bucket: record | {unchanged['listing_s']} | {unchanged['peak_rss_mib']} | – |",
        f"| again, unchanged bucket: `finish()` | {unchanged['marking_s']} | – | {unchanged['marks']} |",
        "",
        f"RSS of the Python process before the listings: {r['rss_before_mib']} MiB; its peak over the whole run"
        f" (VmHWM): {r['vmhwm_mib']} MiB. Recording costs"
        f" {changed['listing_s'] - only['listing_s']:.2f} s over iterating alone"
        f" ({(changed['listing_s'] - only['listing_s']) / n * 1e6:.2f} µs per object) and no memory that grows"
        " with the listing: the process holds one COPY batch (10,000 pairs).",
        "",
        "Queries on the view afterwards:",
        "",
        "| query | s | rows |",
        "| --- | ---: | ---: |",
    ]
    view = r["view"]
    lines += [f"| {name} | {view[name]} | {view[name + ' rows']:,} |" for name in view if not name.endswith(" rows")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
