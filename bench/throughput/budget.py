"""`python -m bench.throughput.budget`: local mode's CPU per image, stage by stage, beside the decode limit's.

Wall-clock rates on a shared machine move with whatever else runs; CPU seconds per image do not (much).
On C cores a run whose images cost T ms of CPU each reaches at most C / T images per second, and the
`limit` scenario (draft decode alone) costs D ms each: local mode can reach at most D / T of the limit
even when it keeps every core as busy as the limit does. This measures D, T and what T is made of:

* each stage on its own, single-threaded (torch on one thread), the best of three passes:
  read, decode, each preprocessing recipe, each model's batch and inference, records and the JSONL write;
* `imagemill annotate` over the whole folder in a child process, as the `local` scenario runs it: its
  CPU per image past start-up (a run over one image measures the start-up: imports, model loads);
* the limit's decode on every core over bytes read beforehand, as `scenarios.limit` runs it.

    python -m bench.throughput.budget --images bench/.cache/images/1280x960-2000 --count 500
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers loads: benchmarks never reach the hub

import argparse
import functools
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench import DEFAULT_CACHE, DEFAULT_RESULTS
from bench.models import model_set
from bench.report import save_results
from bench.throughput.scenarios import parse_summary
from imagemill.core.schemas import ImageRef
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task
from imagemill.pipeline.engine import Engine
from imagemill.pipeline.prepare.decode import Decoded, decode
from imagemill.pipeline.prepare.prefetch import Prepared

TASKS = (Task.CAPTION, Task.MODERATION, Task.TAGS)
PASSES = 3


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def best_ms(images: int, work: Callable[[], object], clock: Callable[[], float] = time.thread_time) -> float:
    """The least CPU milliseconds per image of `PASSES` runs of `work` (this thread's clock by default)."""
    best = float("inf")
    for _ in range(PASSES):
        started = clock()
        work()
        best = min(best, clock() - started)
    return round(best * 1000 / images, 4)


def stages(engine: Engine, paths: list[Path]) -> dict[str, float]:
    """Each stage alone on this thread, CPU ms per image."""
    n, settings = len(paths), engine.settings
    blobs = [path.read_bytes() for path in paths]
    found: dict[str, float] = {}

    def decoded() -> list[Decoded]:
        return [decode(b, max_pixels=settings.max_image_pixels, min_side=engine._min_side) for b in blobs]

    found["read"] = best_ms(n, lambda: [len(path.read_bytes()) for path in paths])
    found["decode"] = best_ms(n, decoded)
    pictures = decoded()
    for index, recipe in enumerate(engine._recipes):
        found[f"preprocess[{index}]"] = best_ms(n, functools.partial(_apply, recipe, [d.image for d in pictures]))
    items = [
        Prepared(ref=ImageRef(uri=str(path)), decoded=d, inputs=[recipe(d.image) for recipe in engine._recipes])
        for path, d in zip(paths, pictures, strict=True)
    ]
    size = settings.batch_size
    batches = [items[i : i + size] for i in range(0, n, size)]
    for runner in engine.runners:
        rows = [[item.inputs[engine._input_of[id(runner)]] for item in batch] for batch in batches]
        tensors = [runner.batch(row) for row in rows]
        found[f"batch[{runner.task.value}]"] = best_ms(n, functools.partial(_apply, runner.batch, rows))
        found[f"infer[{runner.task.value}]"] = best_ms(n, functools.partial(_apply, runner.infer, tensors))
    outcomes = [engine._infer(batch) for batch in batches]
    pairs = [(item, outcome.get(id(item))) for batch, outcome in zip(batches, outcomes, strict=True) for item in batch]
    found["records"] = best_ms(n, lambda: [engine._record(item, outcome, None) for item, outcome in pairs])
    records = [engine._record(item, outcome, None) for item, outcome in pairs]
    found["jsonl"] = best_ms(n, lambda: [record.model_dump_json() for record in records])
    return found


def _apply(work: Callable[[Any], object], inputs: list[Any]) -> list[object]:
    return [work(one) for one in inputs]


def annotate_cpu(folder: Path, count: int, scratch: Path) -> dict[str, float]:
    """`imagemill annotate` as the `local` scenario runs it, in a child process: its CPU seconds per image
    past start-up (a run over one image gives the start-up: imports and model loads), and its summary."""
    one = scratch / "one"
    one.mkdir(parents=True, exist_ok=True)
    first = sorted(folder.glob("*.jpg"))[0]
    (one / first.name).write_bytes(first.read_bytes())

    def run(source: Path) -> tuple[float, str]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        args = [sys.executable, "-m", "imagemill", "annotate", str(source), "--tasks", ",".join(t.value for t in TASKS)]
        args += ["--out", str(scratch / "out.jsonl"), "--force", "-q"]
        done = subprocess.run(args, capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "200"})
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        return cpu, done.stdout + done.stderr

    startup, _ = run(one)
    whole, summary = run(folder)
    elapsed, rate = parse_summary(summary)
    return {
        "startup_cpu_s": round(startup, 2),
        "total_cpu_s": round(whole, 2),
        "process_cpu_ms": round((whole - startup) * 1000 / (count - 1), 4),
        "cores_used": round((whole - startup) / elapsed, 2),
        "images_per_s": rate,
    }


def limit(engine: Engine, paths: list[Path]) -> dict[str, float]:
    """`scenarios.limit`'s decode on every core over bytes read beforehand: process CPU per image."""
    blobs = [path.read_bytes() for path in paths]
    settings = engine.settings

    def one(data: bytes) -> tuple[int, int]:
        return decode(data, max_pixels=settings.max_image_pixels, min_side=engine._min_side).image.size

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        started = time.perf_counter()
        cpu = best_ms(len(blobs), lambda: list(pool.map(one, blobs)), clock=process_cpu)
        wall = time.perf_counter() - started
    return {"process_cpu_ms": cpu, "images_per_s_mean": round(PASSES * len(blobs) / wall, 1)}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Local mode's CPU budget per image (tiny models, caption+moderation+tags)",
        "",
        f"{result['images']} images from `{result['folder']}`, batch {result['batch_size']}, "
        f"{result['cores']} cores, load average {result['load']} at the start. CPU ms per image.",
        "",
        "| stage, alone on one thread | CPU ms/image |",
        "|---|---|",
        *(f"| {name} | {ms:.3f} |" for name, ms in result["stages"].items()),
        f"| **sum** | **{sum(result['stages'].values()):.3f}** |",
        "",
        "| whole run | figure |",
        "|---|---|",
        *(f"| `imagemill annotate` (all {result['annotated']}), {k} | {v} |" for k, v in result["engine"].items()),
        *(f"| limit (decode alone, {result['cores']} threads), {k} | {v} |" for k, v in result["limit"].items()),
        "",
        f"Ceiling of local / limit with equal cores: {result['ceiling']:.2f} "
        f"(the limit's {result['limit']['process_cpu_ms']:.2f} ms over the engine's "
        f"{result['engine']['process_cpu_ms']:.2f} ms). For 0.9 everything but decode would have to fit in "
        f"{result['allowance_for_0_9_ms']:.2f} ms per image; it takes {result['non_decode_ms']:.2f} ms.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput.budget", description=__doc__)
    parser.add_argument("--images", type=Path, default=DEFAULT_CACHE / "images" / "1280x960-2000")
    parser.add_argument("--count", type=int, default=1000, help="images to measure (default 1000)")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    for key, value in model_set("tiny", DEFAULT_CACHE).env().items():
        os.environ.setdefault(key, value)
    settings = Settings(batch_size=64, caption_max_new_tokens=30, device="cpu")
    all_paths = sorted(args.images.glob("*.jpg"))
    paths = all_paths[: args.count]
    load = round(os.getloadavg()[0], 2)
    engine = Engine(settings, TASKS)
    ceiling = limit(engine, paths)
    with tempfile.TemporaryDirectory(prefix="imagemill-budget-") as scratch:
        whole = annotate_cpu(args.images, len(all_paths), Path(scratch))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = stages(engine, paths)
    finally:
        torch.set_num_threads(threads)
    engine.close()
    decode_ms = ceiling["process_cpu_ms"]
    result = {
        "images": len(paths),
        "folder": str(args.images),
        "batch_size": settings.batch_size,
        "cores": os.cpu_count(),
        "load": load,
        "stages": alone,
        "annotated": len(all_paths),
        "engine": whole,
        "limit": ceiling,
        "ceiling": round(decode_ms / whole["process_cpu_ms"], 3),
        "non_decode_ms": round(whole["process_cpu_ms"] - decode_ms, 3),
        "allowance_for_0_9_ms": round(decode_ms / 0.9 - decode_ms, 3),
    }
    text = markdown(result)
    print(text)
    print(json.dumps(result, indent=2))
    save_results(args.out, "local-budget", result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
