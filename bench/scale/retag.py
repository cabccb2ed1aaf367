"""Re-tagging from stored embeddings: 1,000,000 records through `imagemill retag`, records/s and memory.

    python -m bench.scale.retag --records 1000000 --store-records 200000 --out bench/results

A records Parquet file of `--records` synthetic records (random L2-normalised 512-d float32
embeddings, named as made by a real-size CLIP ViT-B/32 with random weights built from its config)
is written once into the cache (not timed). Then, timed in this process, what `imagemill retag`
runs (`imagemill.records.retag.retag`): the text tower loaded from the full checkpoint, the 376
tags of `imagemill/core/data/tags.txt` embedded once, every record scored and written to a new
Parquet file — the columnar path (Arrow batches, no record objects). In the same run, on
`--store-records` of the same records: a JSONL file retagged to JSONL (the JSON path), and a
PostgreSQL store retagged in place (the keyed path: keys and vectors read in binary batches, new
rows copied from the old ones in the database; the server's CPU counts in the wall time, not in
this process's CPU s); and for contrast the records path (pydantic records) on `--record-path`
records. The memory of this process and of the JSON path's forked parts (PSS: the pages they share
counted once) is sampled every 0.1 s throughout; the CPU s include the parts'.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from psycopg import sql

from bench import DEFAULT_CACHE, DEFAULT_RESULTS
from bench.machine import Interference, describe, loadavg, wait_for_idle
from bench.memory import MIB, Sampler, curve, drift, peak_rss
from bench.models import build_clip_b32_tags, tiny_set
from bench.report import save_results
from imagemill.core.settings import DEFAULT_VOCABULARY, Settings
from imagemill.core.sinks.files import iter_records, parquet_schema, writer_options
from imagemill.core.sinks.postgres import PostgresSink
from imagemill.pipeline.models.runner import weights_hash
from imagemill.pipeline.models.text_tower import TextTower
from imagemill.pipeline.models.zero_shot import TagOptions
from imagemill.records.retag import Retag
from imagemill.records.retagger import RetagCounts
from tests.fixtures.postgres import admin_url
from tests.fixtures.tiny_models import quiet_transformers

DIM = 512  # CLIP ViT-B/32's projection
BATCH = 65_536  # rows per generated row group
FILE_VERSION = 2  # of the cached input files: bump when how they are written changes


def model(cache: Path) -> Path:
    """CLIP ViT-B/32 at its real size with random weights (the tiny tokenizer), built once."""
    out = cache / "models" / "retag" / "clip-b32"
    if not (out / "model.safetensors").is_file():
        with quiet_transformers():
            build_clip_b32_tags(out, tiny_set(cache).tags)
    return out


def records_file(path: Path, count: int, clip: Path) -> Path:
    """`count` records with embeddings (and old tags), as `annotate --tasks tags,embedding` writes them."""
    if path.is_file() and pq.ParquetFile(path).metadata.num_rows == count:
        return path
    schema = parquet_schema(DIM)
    revision = weights_hash(clip)
    rng = np.random.default_rng(0)
    partial = path.with_suffix(".partial")
    # as `annotate --out x.parquet` writes them (the embedding's floats byte-stream-split)
    with pq.ParquetWriter(partial, schema, **writer_options(schema)) as writer:
        for start in range(0, count, BATCH):
            n = min(BATCH, count - start)
            writer.write_table(_batch(schema, start, n, rng, str(clip), revision))
    partial.replace(path)
    return path


def _batch(schema: pa.Schema, start: int, n: int, rng: np.random.Generator, clip: str, revision: str) -> pa.Table:
    vectors = rng.standard_normal((n, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    embedding_type = schema.field("embedding").type
    embedding = pa.StructArray.from_arrays(
        [
            pa.repeat(pa.scalar(clip), n),
            pa.repeat(pa.scalar(revision), n),
            pa.repeat(pa.scalar(DIM, pa.int32()), n),
            pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
        ],
        fields=list(embedding_type),
    )
    old_tags = [{"model": clip, "revision": revision, "labels": [{"tag": "photo", "score": 0.5}]}] * n
    columns: dict[str, Any] = {
        "uri": pa.array([f"s3://bench/photos/{i:08d}.jpg" for i in range(start, start + n)]),
        "etag": pa.repeat(pa.scalar("e1"), n),
        "bytes": pa.repeat(pa.scalar(250_000, pa.int64()), n),
        "image": pa.array([{"width": 1280, "height": 960, "format": "JPEG"}] * n, schema.field("image").type),
        "tags": pa.array(old_tags, schema.field("tags").type),
        "embedding": embedding,
        "signature": pa.repeat(pa.scalar("annotated-signature"), n),
        "job_id": pa.repeat(pa.scalar("bench"), n),
        "timings": pa.array([{"fetch_ms": 1.0, "decode_ms": 2.0, "infer_ms": 3.0}] * n, schema.field("timings").type),
        "processed_at": pa.repeat(pa.scalar(datetime(2026, 11, 1, tzinfo=UTC), pa.timestamp("us", tz="UTC")), n),
    }
    arrays = [columns.get(field.name, pa.nulls(n, field.type)) for field in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def jsonl_file(path: Path, parquet: Path) -> Path:
    """The records of a records Parquet file as `annotate --out x.jsonl` writes them (not timed)."""
    count = pq.ParquetFile(parquet).metadata.num_rows
    if path.is_file() and sum(1 for _ in path.open()) == count:
        return path
    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as handle:
        handle.writelines(record.model_dump_json() + "\n" for record in iter_records(parquet))
    partial.replace(path)
    return path


def postgres_store(admin: str, jsonl: Path) -> str:
    """A fresh database holding the JSONL file's records as the PostgreSQL sink stores them (its own
    table, view and `embedding` column), loaded with COPY (not timed); its URL."""
    name = "imagemill_bench_retag"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = admin.rsplit("/", 1)[0] + "/" + name
    PostgresSink(url).check()  # the table and its view
    columns = "uri, etag, signature, job_id, processed_at, record, embedding"
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY imagemill_records ({columns}) FROM STDIN") as copy, jsonl.open() as handle:
            for line in handle:
                row = json.loads(line)
                vector = np.frombuffer(base64.b64decode(row["embedding"]["vector"]), "<f4")
                embedding = "{" + ",".join(map(repr, vector.tolist())) + "}"
                copy.write_row((row["uri"], row["etag"], row["signature"], row["job_id"], row["processed_at"],
                                line.strip(), embedding))  # fmt: skip
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE imagemill_records")
    return url


def drop_store(admin: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS imagemill_bench_retag WITH (FORCE)")


def timed_retag(
    source: Path | str, out: Path | None, clip: Path, vocabulary: Path, warm: Any = None, processes: int | None = None
) -> dict[str, Any]:
    """One `imagemill retag SOURCE --vocabulary … [--out OUT]`, in this process; with `warm` (a
    `Retagger` that has scored records already), its loaded text tower and vocabulary are reused, so
    the time is the records' alone (the load is timed once, by `timed_load`); `processes` is
    IMAGEMILL_RETAG_PROCESSES (default: the CPU count)."""
    settings = Settings(tags_model=str(clip), tags_vocabulary=vocabulary, tags_threshold=0.0, device="cpu")
    if processes is not None:
        settings = settings.model_copy(update={"retag_processes": processes})
    # PSS of this process and the JSON path's forked parts: RSS would count the pages they share again
    with Interference() as others, Sampler(os.getpid(), 0.1, proportional=True) as sampler:
        started, cpu = time.perf_counter(), _cpu_s()
        run = Retag(str(source), settings, out, history=False)
        if warm is not None:
            warm.counts = RetagCounts()
            run.retagger = warm
        done = run.run()
        counts = done.counts
        elapsed, cpu = time.perf_counter() - started, _cpu_s() - cpu
    rss = [s.rss / MIB for s in sampler.samples]
    steady = rss[len(rss) // 10 :] or rss  # past the model's loading
    return {
        "path": done.path,
        "processes": done.processes,
        "records": counts.retagged,
        "without_embedding": counts.without_embedding,
        "own_signature": counts.own_signature,
        "seconds": round(elapsed, 2),
        "cpu_s": round(cpu, 1),
        "records_per_s": round(counts.retagged / elapsed),
        "rss_start_mib": round(rss[0], 1),
        "rss_peak_mib": round(max(rss), 1),
        "rss_end_mib": round(rss[-1], 1),
        "steady_drift": round(drift(steady), 4),
        "rss_curve": curve(sampler.samples),
        "others_cores": round(others.others_cores, 2),
        "cpu_us_per_record": round(cpu / max(1, counts.retagged) * 1e6, 1),
        "warm": warm is not None,
        "output_mib": round(out.stat().st_size / MIB, 1) if out is not None else None,
    }


def timed_load(clip: Path, vocabulary: Path) -> dict[str, float]:
    """The text tower's load and the vocabulary's embedding alone (inside the timed runs too)."""
    started, cpu = time.perf_counter(), _cpu_s()
    tower = TextTower(str(clip), None, torch.device("cpu"))
    loaded = time.perf_counter()
    words = Settings(tags_vocabulary=vocabulary).vocabulary
    tower.scorer(TagOptions(tuple(words), "a photo of {}.", 5, 0.0))
    return {
        "load_s": round(loaded - started, 2),
        "vocabulary_s": round(time.perf_counter() - loaded, 2),
        "cpu_s": round(_cpu_s() - cpu, 1),
        "tags": len(words),
        "parameters_m": round(sum(p.numel() for p in tower.model.parameters()) / 1e6, 1),
    }


def _cpu_s() -> float:
    """CPU seconds of this process, all its threads, and of its children once ended (the JSON
    path's parts' processes): what a busy machine cannot take away."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale.retag", description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--record-path", type=int, default=50_000, help="records through the pydantic path")
    parser.add_argument("--store-records", type=int, default=200_000, help="records through JSONL and PostgreSQL")
    parser.add_argument("--postgres", default=None, help="admin URL of a PostgreSQL server (default: the tests')")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--idle-wait", type=float, default=120.0, help="seconds to wait for a quieter machine")
    parser.add_argument(
        "--warm", action="store_true", help="load the text tower once and time each path past it (records/s alone)"
    )
    args = parser.parse_args()
    clip = model(args.cache)
    data = args.cache / "retag"
    data.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    big = records_file(data / f"records-{args.records}-{FILE_VERSION}.parquet", args.records, clip)
    small = records_file(data / f"records-{args.record_path}-{FILE_VERSION}.parquet", args.record_path, clip)
    stored = records_file(data / f"records-{args.store_records}-{FILE_VERSION}.parquet", args.store_records, clip)
    jsonl = jsonl_file(data / f"records-{args.store_records}-{FILE_VERSION}.jsonl", stored)
    admin = args.postgres or admin_url()
    store = postgres_store(admin, jsonl)
    result: dict[str, Any] = {
        "records": args.records,
        "machine": describe(),
        "prepare_s": round(time.perf_counter() - started, 1),
        "input_mib": round(big.stat().st_size / MIB, 1),
        "vocabulary": "imagemill/core/data/tags.txt",
    }
    result["idle"] = wait_for_idle(0.25, args.idle_wait)
    result["loadavg_start"] = loadavg()
    result["load"] = timed_load(clip, DEFAULT_VOCABULARY)
    if args.warm:  # the text tower loaded once, by a first retag of the small file; each path timed past it
        settings = Settings(tags_model=str(clip), tags_vocabulary=DEFAULT_VOCABULARY, tags_threshold=0.0, device="cpu")
        sample = data / "warm.parquet"  # a thousand records: the load is what this run is for
        pq.write_table(pq.ParquetFile(small).read_row_group(0).slice(0, 1000), sample)
        first = Retag(str(sample), settings, data / "warm-out.parquet", history=False)
        first.run()
        warm = first.retagger
    else:
        warm = None
    result["warm"] = args.warm
    result["columnar"] = timed_retag(big, data / "retagged.parquet", clip, DEFAULT_VOCABULARY, warm)
    result["json_path"] = timed_retag(jsonl, data / "retagged.jsonl", clip, DEFAULT_VOCABULARY, warm)
    result["json_postgres"] = timed_retag(store, data / "retagged.jsonl", clip, DEFAULT_VOCABULARY, warm)
    # the same two in one process: what the split gains here (on a machine whose other work takes
    # cores, little or nothing: the kernel shares them out by session, not by process)
    result["json_path_one"] = timed_retag(jsonl, data / "retagged.jsonl", clip, DEFAULT_VOCABULARY, warm, 1)
    result["json_postgres_one"] = timed_retag(store, data / "retagged.jsonl", clip, DEFAULT_VOCABULARY, warm, 1)
    result["keyed_path"] = timed_retag(store, None, clip, DEFAULT_VOCABULARY, warm)
    drop_store(admin)
    result["records_path"] = timed_retag(small, data / "retagged.jsonl", clip, DEFAULT_VOCABULARY, warm)
    result["vmhwm_mib"] = round((peak_rss(os.getpid()) or 0) / MIB, 1)
    result["loadavg_end"] = loadavg()
    for name in ("retagged.parquet", "retagged.jsonl", "warm.parquet", "warm-out.parquet"):
        (data / name).unlink(missing_ok=True)
    text = report(result)
    save_results(args.out, "retag", result, text)
    print(text)


def report(r: dict[str, Any]) -> str:
    n, load, col, rec = r["records"], r["load"], r["columnar"], r["records_path"]
    paths = [
        ("columnar: Parquet → Parquet", col),
        ("JSON objects: JSONL → JSONL", r["json_path"]),
        ("JSON objects: PostgreSQL → JSONL", r["json_postgres"]),
        *(
            (name, r[key])
            for name, key in (
                ("JSON objects: JSONL → JSONL", "json_path_one"),
                ("JSON objects: PostgreSQL → JSONL", "json_postgres_one"),
            )
            if key in r
        ),
        ("keyed: PostgreSQL in place", r["keyed_path"]),
        ("records: Parquet → JSONL (pydantic)", rec),
    ]
    warm = r.get("warm", False)
    machine = r["machine"]
    lines = [
        f"# imagemill benchmark — retag of {n:,} records from stored embeddings",
        "",
        f"`python -m bench.scale.retag --records {n} --store-records {r['json_postgres']['records']}"
        f" --record-path {rec['records']}{' --warm' if warm else ''}`",
        "",
        f"Machine: {machine.get('cpus')} CPUs ({machine.get('cpu_model')}), torch {machine.get('torch')} with"
        f" {machine.get('torch_threads')} threads, commit {machine.get('commit')}. Load average"
        f" {r['loadavg_start']} at the start, {r['loadavg_end']} at the end.",
        "",
        f"Input: a records Parquet file of {n:,} records with {DIM}-d float32 embeddings ({r['input_mib']:,} MiB,"
        f" zstd; written in {r['prepare_s']} s, not timed). Model: CLIP ViT-B/32 at its real size, random weights"
        f" (text tower {load['parameters_m']} M parameters, loaded alone in {load['load_s']} s; its"
        f" {load['tags']} tags of `{r['vocabulary']}` embedded in {load['vocabulary_s']} s; {load['cpu_s']} CPU s"
        " together). top-k 5, threshold 0.",
        "",
        f"| path | records | s ({'past the load' if warm else 'load included'}) | records/s | CPU s |"
        " CPU s past the load, per 1M records | PSS start → peak → end (MiB) | steady drift | others' cores |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for name, row in paths:
        per_million = (row["cpu_s"] - (0 if warm else load["cpu_s"])) / row["records"] * 1e6
        count = row.get("processes", 1)
        split = f" ({count} processes)" if count > 1 else " (one process)" if row["path"] == "json" else ""
        lines.append(
            f"| {name}{split} | {row['records']:,} | {row['seconds']} | {row['records_per_s']:,} | {row['cpu_s']} |"
            f" {per_million:,.1f} | {row['rss_start_mib']} → {row['rss_peak_mib']} → {row['rss_end_mib']} |"
            f" {row['steady_drift']:+.1%} | {row['others_cores']} |"
        )
    lines += [
        "",
        "Goals: ≥ 50,000 records/s from Parquet and ≥ 25,000 from JSONL and PostgreSQL, memory flat. The"
        " columnar path reads Arrow batches of 65,536 rows, scores them in one matrix product and writes them"
        " back with the `tags`, `signature`, `processed_at` and `task_options` columns replaced; the JSON path"
        " reads each JSONL line as a JSON object (no record object), decodes the vectors into one matrix per"
        " 4,096 lines and writes the objects back with those fields replaced (the next batch read and parsed,"
        " the last one serialised and written, on threads of their own), and a large input (32 MiB of JSONL,"
        " 10,000 rows of PostgreSQL) is split over a process per core (`IMAGEMILL_RETAG_PROCESSES`: byte"
        " ranges of the file on line boundaries, key ranges of one snapshot of the store), forked once the"
        " text tower is loaded, each scoring on one torch thread into a part file, the parts then joined in"
        " order (the same bytes as one process; the rows marked one process are the same inputs with"
        " IMAGEMILL_RETAG_PROCESSES=1); the keyed path reads keys and"
        " vectors from PostgreSQL (binary, one snapshot) and has the database copy each old row into its new"
        " one (one COPY of keys and new tags, one INSERT … SELECT per 4,096 records stored with lz4, two batches"
        " in flight on two connections, the next batch read and scored meanwhile); PostgreSQL → JSONL reads"
        " the records' JSON (one snapshot, keys sorted before the records are read out, the next batch made by"
        " the server meanwhile) into the JSON path; the"
        " records path builds and validates one pydantic record per row (any other pair: PostgreSQL to Parquet,"
        " object sinks)."
        + (
            " With --warm the text tower is loaded once before the runs (the load line above) and every"
            " path reuses it: the times are the records' alone."
            if warm
            else ""
        ),
        "",
        "PSS over the columnar run (s, MiB):"
        + " ".join(f" {p['t_s']}:{p['rss_mib']}" for p in col["rss_curve"] if "t_s" in p and "rss_mib" in p),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
