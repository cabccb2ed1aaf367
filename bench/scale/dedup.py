"""Near-duplicate grouping (`imagemill dedup`) on synthetic CLIP-sized embeddings: time and memory.

    python -m bench.scale.dedup --records 100000 --out bench/results

`--records` records with `--dim` (512, CLIP ViT-B/32) float32 embeddings are written to a Parquet
file (not timed): random unit vectors, except that 2 % of them are planted near-duplicates of
the record before it (cosine about 0.98). Then, timed in this process:

- *read*: `read_records` + `near_duplicates.collect` (the Parquet file into one float32 matrix);
- *group*: `near_duplicates.group` at threshold 0.95, exact, in tiles of `--block` rows (the
  default of the command); the planted groups must come back, and only they;
- *tiles*: the same grouping on the first `--sweep` records at several tile sizes;
- with `--faiss`, faiss-cpu on those records: `IndexFlatIP` (exact) and `IndexIVFFlat` (approximate,
  two `nprobe`), each a range search at the threshold, with the share of the exact pairs found;
  and `IndexIVFFlat` on all the records, with the share of the planted pairs found;
- the Python process's RSS sampled every 20 ms, and its VmHWM.

Exact grouping is quadratic: the report extrapolates its time to 1,000,000 records as
(1,000,000 / n)² x the measured time, and its memory as the embeddings' bytes plus a tile.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import describe, loadavg
from bench.memory import MIB, Sampler, peak_rss, rss
from bench.report import save_results
from imagemill.core.schemas import Embedding, ImageInfo, Record
from imagemill.core.sinks import open_file_sink, read_records
from imagemill.records.choices import DEFAULT_BLOCK
from imagemill.records.near_duplicates import collect, components, group, similar_pairs

THRESHOLD = 0.95
PLANTED = 0.02  # share of records that are a near-copy of another


def embeddings(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """n unit vectors; one in every 1 / PLANTED is a near-copy of the one before it (so any prefix
    of the records holds its share of the planted pairs)."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    every = round(1 / PLANTED)
    originals = np.arange(0, n - 1, every)
    # noise of norm ~0.2 against a unit vector: cosine ~0.98, well above 0.95, far below 1
    noise = rng.normal(scale=0.2 / np.sqrt(dim), size=(len(originals), dim)).astype(np.float32)
    vectors[originals + 1] = vectors[originals] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, len(originals)


def write(path: Path, vectors: np.ndarray) -> None:
    with open_file_sink(str(path)) as writer:
        for start in range(0, len(vectors), 4096):
            writer.write(
                [
                    Record(
                        uri=f"s3://bench/photos/{start + i:08d}.jpg",
                        etag="e1",
                        bytes=100_000 + start + i,
                        image=ImageInfo(width=640, height=480, format="JPEG"),
                        embedding=Embedding.of(vector, model="clip-vit-b-32"),
                        signature="sig",
                    )
                    for i, vector in enumerate(vectors[start : start + 4096])
                ]
            )


def faiss_pairs(index: Any, vectors: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """The pairs (i < j) a faiss index finds at inner product ≥ threshold (range search, in batches)."""
    found: set[tuple[int, int]] = set()
    for start in range(0, len(vectors), 8192):
        # faiss's range search keeps results strictly above the radius
        lims, _, ids = index.range_search(vectors[start : start + 8192], float(np.nextafter(np.float32(threshold), 0)))
        for row in range(len(lims) - 1):
            i = start + row
            found.update((i, int(j)) for j in ids[lims[row] : lims[row + 1]] if j > i)
    return found


def faiss_runs(vectors: np.ndarray, threshold: float) -> dict[str, Any]:
    """faiss-cpu on the same embeddings: exact (IndexFlatIP) and approximate (IVF, inner product)."""
    import faiss  # faiss-cpu is optional: only `--faiss` needs it

    dim = vectors.shape[1]
    runs: dict[str, Any] = {"version": faiss.__version__}
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(dim)
    flat.add(vectors)
    exact = faiss_pairs(flat, vectors, threshold)
    runs["flat_s"] = round(time.perf_counter() - start, 2)
    runs["flat_pairs"] = len(exact)
    for nprobe in (8, 32):
        runs |= ivf_run(vectors, threshold, nprobe, exact)
    return runs


def ivf_run(vectors: np.ndarray, threshold: float, nprobe: int, exact: set[tuple[int, int]]) -> dict[str, Any]:
    """An `IndexIVFFlat` of 4·√n lists trained, filled and range-searched with `nprobe` lists probed:
    its time, and the share of the `exact` pairs it found."""
    import faiss  # faiss-cpu is optional: only `--faiss` needs it

    n, dim = vectors.shape
    nlist = int(4 * np.sqrt(n))
    start = time.perf_counter()
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(vectors[np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False)])
    ivf.add(vectors)
    ivf.nprobe = nprobe
    approx = faiss_pairs(ivf, vectors, threshold)
    return {
        f"ivf{nlist}_nprobe{nprobe}_s": round(time.perf_counter() - start, 2),
        f"ivf{nlist}_nprobe{nprobe}_recall": round(len(approx & exact) / max(1, len(exact)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale.dedup", description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--block", type=int, default=DEFAULT_BLOCK)
    parser.add_argument("--sweep", type=int, default=20_000, help="records for the tile-size sweep (0: none)")
    parser.add_argument(
        "--faiss",
        action="store_true",
        help="also time faiss-cpu, exact and IVF, on the sweep's records (pip install faiss-cpu)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    n, dim = args.records, args.dim
    result: dict[str, Any] = {"records": n, "dim": dim, "block": args.block, "threshold": THRESHOLD}
    result |= {"machine": describe(), "loadavg_start": loadavg()}
    vectors, copies = embeddings(n, dim)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.parquet"
        start = time.perf_counter()
        write(path, vectors)
        result["write_s"] = round(time.perf_counter() - start, 1)
        result["parquet_mib"] = round(path.stat().st_size / MIB, 1)
        sweep = vectors[: args.sweep].copy() if args.sweep else None
        del vectors
        result["rss_before_mib"] = round((rss(os.getpid()) or 0) / MIB, 1)
        with Sampler(tree=False) as sampler:
            start = time.perf_counter()
            found = collect(read_records(str(path)))
            result["read_s"] = round(time.perf_counter() - start, 4)
        result["read_peak_rss_mib"] = round(sampler.peak / MIB, 1)
    import scipy.sparse.csgraph  # noqa: F401  (loaded before the clock starts, as a warm `imagemill dedup` has it)

    with Sampler(tree=False) as sampler:
        start = time.perf_counter()
        groups = group(found, THRESHOLD, args.block)
        result["group_s"] = round(time.perf_counter() - start, 4)
    result["group_peak_rss_mib"] = round(sampler.peak / MIB, 1)
    result["groups"] = len(groups)
    result["planted"] = copies
    result["groups_as_planted"] = len(groups) == copies and all(g.size == 2 for g in groups)
    result["embeddings_mib"] = round(found.vectors.nbytes / MIB, 1)
    if args.faiss and sweep is not None:
        result["faiss"] = faiss_runs(sweep, THRESHOLD)
    if args.faiss:
        # all records, against the planted pairs (the exact grouping above found exactly those)
        every = round(1 / PLANTED)
        planted = {(int(i), int(i) + 1) for i in range(0, n - 1, every)}
        result["faiss_all"] = {"records": n}
        for nprobe in (8, 32):
            result["faiss_all"] |= ivf_run(found.vectors, THRESHOLD, nprobe, planted)
    if sweep is not None:
        result["sweep"] = {"records": len(sweep)}
        for block in (512, 1024, 2048, 4096, 8192):
            start = time.perf_counter()
            components(len(sweep), similar_pairs(sweep, THRESHOLD, block))
            result["sweep"][str(block)] = round(time.perf_counter() - start, 2)
    result["vmhwm_mib"] = round((peak_rss(os.getpid()) or 0) / MIB, 1)
    result["loadavg_end"] = loadavg()
    text = report(result)
    save_results(args.out, "dedup", result, text)
    print(text)


def report(r: dict[str, Any]) -> str:
    n, dim, block = r["records"], r["dim"], r["block"]
    # A smoke run of a few hundred records can time a step under the rounding; a floor keeps the rates finite.
    read_s, group_s = max(r["read_s"], 1e-4), max(r["group_s"], 1e-4)
    pairs = n * (n + 1) / 2
    scale = (1_000_000 / n) ** 2
    million_mib = 1_000_000 * dim * 4 / MIB
    tile_mib = block * block * 5 / MIB  # float32 products and their bool mask
    machine = r["machine"]
    lines = [
        f"# imagemill benchmark — near-duplicate grouping of {n:,} embeddings (dim {dim})",
        "",
        f"`python -m bench.scale.dedup --records {n} --dim {dim} --block {block}`",
        "",
        f"Machine: {machine.get('cpus')} CPUs, commit {machine.get('commit')}. Load average {r['loadavg_start']} at"
        f" the start, {r['loadavg_end']} at the end (other processes share the CPUs: distrust the times when it is"
        " well above the CPU count).",
        "",
        f"Records: {n:,} in a Parquet file of {r['parquet_mib']} MiB (written in {r['write_s']} s, not timed),"
        f" {r['planted']:,} of them planted near-copies (cosine ≈ 0.98) of others; threshold {r['threshold']}.",
        "",
        "| step | s | records/s | peak RSS (MiB) |",
        "| --- | ---: | ---: | ---: |",
        f"| read: `read_records` + `collect` | {r['read_s']} | {n / read_s:,.0f} | {r['read_peak_rss_mib']} |",
        f"| group: exact, tiles of {block:,} | {r['group_s']} | {n / group_s:,.0f} | {r['group_peak_rss_mib']} |",
        "",
        f"Grouping compared {pairs:,.0f} pairs: {pairs / group_s / 1e6:,.0f} M pairs/s,"
        f" {pairs * 2 * dim / group_s / 1e9:,.1f} GFLOP/s of float32 matrix products. It found"
        f" {r['groups']:,} groups ({'exactly' if r['groups_as_planted'] else 'NOT'} the planted pairs)."
        f" The embeddings took {r['embeddings_mib']} MiB; RSS before reading {r['rss_before_mib']} MiB, peak over"
        f" the run (VmHWM) {r['vmhwm_mib']} MiB.",
        "",
        f"**Extrapolated to 1,000,000 records** on this machine: grouping ≈ {r['group_s'] * scale / 3600:,.1f} h"
        f" ((1,000,000 / {n:,})² x {r['group_s']} s: exact comparison is quadratic), reading ≈"
        f" {r['read_s'] * 1_000_000 / n / 60:,.1f} min; memory ≈ {million_mib:,.0f} MiB of embeddings (twice that"
        f" for a moment while the batches are joined) + {tile_mib:,.0f} MiB for one tile.",
    ]
    if "sweep" in r:
        sweep = r["sweep"]
        lines += [
            "",
            f"Tile size against time, grouping the first {sweep['records']:,} records:",
            "",
            "| tile rows | s | tile memory (MiB) |",
            "| ---: | ---: | ---: |",
        ]
        lines += [f"| {int(b):,} | {s} | {int(b) ** 2 * 5 / MIB:,.0f} |" for b, s in sweep.items() if b != "records"]
    if "faiss" in r:
        f = r["faiss"]
        lines += [
            "",
            f"faiss-cpu {f['version']} on the sweep's {r['sweep']['records']:,} embeddings (index built, then a range"
            " search at the threshold), against the exact tiles above:",
            "",
            "| index | s | pairs found / exact pairs |",
            "| --- | ---: | ---: |",
            f"| `IndexFlatIP` (exact) | {f['flat_s']} | {f['flat_pairs']:,} pairs |",
        ]
        lines += [
            f"| `IndexIVFFlat` {key[3:].split('_')[0]} lists, {key.split('_')[1]} | {f[key]} |"
            f" {f[key.removesuffix('_s') + '_recall']:.2%} |"
            for key in f
            if key.startswith("ivf") and key.endswith("_s")
        ]
    if "faiss_all" in r:
        f = r["faiss_all"]
        lines += [
            "",
            f"faiss-cpu `IndexIVFFlat` on all {f['records']:,} embeddings (trained, filled, range-searched), against"
            f" the exact tiles' {r['group_s']} s:",
            "",
            "| index | s | planted pairs found |",
            "| --- | ---: | ---: |",
        ]
        lines += [
            f"| `IndexIVFFlat` {key[3:].split('_')[0]} lists, {key.split('_')[1]} | {f[key]} |"
            f" {f[key.removesuffix('_s') + '_recall']:.2%} |"
            for key in f
            if key.startswith("ivf") and key.endswith("_s")
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
