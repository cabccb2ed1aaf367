"""dedup's faiss IVF parameters side by side: lists, lists probed, neighbours and the list codes
(Flat or SQ8) against CPU seconds and the recall of planted near-copies, on one set of embeddings.

    python -m bench.scale.dedup_ivf --records 100000 --threads 1 --out bench/results

The embeddings are `bench.scale.dedup`'s (random unit 512-d vectors, 2 % planted near-copies at cosine
≈ 0.98). Each variant builds its index as `near_duplicates.ivf_index` does (PCA to 64, unit
length, an HNSW graph over the centroids, the same k-means sample) with its own lists and codes,
and searches with `near_duplicates.ivf_pairs` (every candidate checked exactly). CPU seconds are
this process's, all threads: on a machine others keep busy, the wall clock says how busy it was.
A variant's recall here is an upper bound of its recall at a million (the lists grow with √n).
"""

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import DEFAULT_RESULTS
from bench.machine import loadavg
from bench.report import save_results
from bench.scale.dedup import PLANTED, THRESHOLD, embeddings
from imagemill.records import near_duplicates as nd

# name: (lists per √n, lists probed, neighbours, codes); the first is what `imagemill dedup` runs
VARIANTS: dict[str, tuple[float, int, int, str]] = {
    "default (2·√n lists, 48 probed, Flat)": (nd.LISTS_PER_ROOT, nd.NPROBE, nd.NEIGHBOURS, "Flat"),
    "4·√n lists, 32 probed, Flat": (4, 32, nd.NEIGHBOURS, "Flat"),
    "4·√n lists, 32 probed, SQ8": (4, 32, nd.NEIGHBOURS, "SQ8"),
}


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def variant(vectors: np.ndarray, per_root: float, nprobe: int, neighbours: int, codes: str) -> dict[str, Any]:
    import faiss  # the dedup extra

    n, dim = vectors.shape
    started, cpu = time.perf_counter(), _cpu_s()
    lists = max(1, min(int(per_root * math.sqrt(n)), n // 8))
    index = faiss.index_factory(dim, f"PCA{nd.REDUCED},L2norm,IVF{lists}_HNSW32,{codes}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = nd.KMEANS_ITERATIONS
    ivf.cp.max_points_per_centroid = nd.KMEANS_POINTS_PER_LIST
    ivf.cp.min_points_per_centroid = 1
    sample = lists * nd.KMEANS_POINTS_PER_LIST
    chosen = vectors if n <= sample else vectors[np.sort(np.random.default_rng(0).choice(n, sample, replace=False))]
    index.train(chosen)
    index.add(vectors)
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", min(nprobe, lists))
    built, built_cpu = time.perf_counter(), _cpu_s()
    found: set[tuple[int, int]] = set()
    # the index given, ivf_pairs also finds each vector itself (a corpus search): those are left out
    for rows, cols in nd.ivf_pairs(vectors, THRESHOLD, index=index, indexed=vectors, neighbours=neighbours + 1):
        other = rows != cols
        found.update(zip(np.minimum(rows, cols)[other].tolist(), np.maximum(rows, cols)[other].tolist(), strict=True))
    done, done_cpu = time.perf_counter(), _cpu_s()
    every = round(1 / PLANTED)
    planted = [(i, i + 1) for i in range(0, n - 1, every)]
    hits = sum(pair in found for pair in planted)
    return {
        "lists": lists,
        "nprobe": nprobe,
        "neighbours": neighbours,
        "codes": codes,
        "build_s": round(built - started, 1),
        "build_cpu_s": round(built_cpu - cpu, 1),
        "search_s": round(done - built, 1),
        "search_cpu_s": round(done_cpu - built_cpu, 1),
        "recall": round(hits / len(planted), 4),
        "other_pairs": len(found) - hits,
        "loadavg": loadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale.dedup_ivf", description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=0, help="faiss's OpenMP threads (0: its default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args()
    import faiss  # the dedup extra

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    vectors, planted = embeddings(args.records, 512)
    result: dict[str, Any] = {"records": args.records, "planted": planted, "threads": args.threads}
    result["loadavg_start"] = loadavg()
    result["variants"] = {name: variant(vectors, *spec) for name, spec in VARIANTS.items()}
    result["loadavg_end"] = loadavg()
    text = report(result)
    save_results(args.out, "dedup-ivf", result, text)
    print(text)


def report(r: dict[str, Any]) -> str:
    lines = [
        f"# imagemill benchmark — dedup's IVF parameters on {r['records']:,} embeddings (dim 512)",
        "",
        f"`python -m bench.scale.dedup_ivf --records {r['records']} --threads {r['threads']}`",
        "",
        f"Load average {r['loadavg_start']} at the start, {r['loadavg_end']} at the end. {r['planted']:,} planted"
        " near-copies (cosine ≈ 0.98), threshold 0.95; vectors reduced to 64 dimensions (PCA, unit length).",
        "",
        "| variant | lists | build s / CPU s | search s / CPU s | planted pairs found | other pairs |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, v in r["variants"].items():
        lines.append(
            f"| {name} | {v['lists']:,} | {v['build_s']} / {v['build_cpu_s']} | {v['search_s']} / {v['search_cpu_s']}"
            f" | {v['recall']:.2%} | {v['other_pairs']} |"
        )
    lines += [
        "",
        "The search's CPU grows with the share of the vectors scanned per query (lists probed ÷ lists);"
        " recall falls as that share does, and falls further as n grows: a variant is worth a default only"
        " once `python -m bench.scale.dedup_million` has measured it at a million.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
