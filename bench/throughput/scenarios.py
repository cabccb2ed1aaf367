"""One function per scenario; each returns a `Result` whose headline is images per second.

In this process: `limit` (decode alone), `naive` (a plain loop), `model_only` (models on tensors).
In child processes this run owns: `local` (`imagemill annotate`), `distributed` (submit → Redis →
one worker → PostgreSQL), and the memory runs (`worker_memory`, `producer_memory`).
"""

import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from bench import REPO
from bench.images import ImageSet, cycling_manifest, synthetic_manifest
from bench.memory import MIB, Sampler, curve, deciles, drift
from bench.models import ModelSet
from bench.throughput import direct
from bench.throughput.services import QueueWatch, distributed_stack, record_count, submit_and_wait
from imagemill.core.settings import Settings
from imagemill.pipeline.prepare.decode import decode

SUBPROCESS_TIMEOUT_S = 4 * 3600


@dataclass
class Bench:
    """What every scenario of one model set runs on."""

    images: ImageSet
    models: ModelSet
    tasks: tuple[str, ...]
    settings: Settings  # batch size, caption length, … as every scenario uses them
    env: dict[str, str]  # IMAGEMILL_* and friends for the child processes
    scratch: Path
    chunk_size: int
    memory_images: int
    producer_objects: int
    sample_interval: float
    naive_batch_size: int = 16
    limit_repeats: int = 3

    @property
    def folders(self) -> dict[str, Path]:
        return {task: self.models.folder(task) for task in self.tasks}

    def child_env(self) -> dict[str, str]:
        return {**os.environ, **self.env, "PYTHONPATH": str(REPO), "COLUMNS": "200"}


@dataclass
class Result:
    scenario: str
    images: int
    seconds: float  # the timed part only
    details: dict[str, Any] = field(default_factory=dict)
    images_per_s: float | None = None  # when it is not images / seconds (e.g. a rate parsed from a summary)

    def __post_init__(self) -> None:
        if self.images_per_s is None:
            self.images_per_s = self.images / self.seconds if self.seconds > 0 else 0.0


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# -- in this process --------------------------------------------------------------------------------


def limit(b: Bench) -> Result:
    """Draft decode alone (`imagemill.pipeline.prepare.decode.decode` at the models' min side) on every core.

    The best of `limit_repeats` passes: a ceiling should not carry another process's noise."""
    side = direct.min_side(direct.load_processors(b.folders, b.tasks))
    blobs = [path.read_bytes() for path in b.images.paths]
    threads = os.cpu_count() or 1
    max_pixels = b.settings.max_image_pixels

    def one(data: bytes) -> tuple[int, int]:
        return decode(data, max_pixels=max_pixels, min_side=side).image.size

    times = []
    with ThreadPoolExecutor(threads, thread_name_prefix="bench-decode") as pool:
        for _ in range(max(1, b.limit_repeats)):
            started = time.perf_counter()
            sizes = list(pool.map(one, blobs))
            times.append(time.perf_counter() - started)
    details = {
        "threads": threads,
        "min_side": side,
        "decoded_size": list(sizes[0]),
        "best_of": len(times),
        "all_images_per_s": [round(len(blobs) / t, 1) for t in times],
    }
    return Result("limit", len(blobs), min(times), details)


def naive(b: Bench) -> Result:
    """A plain loop: full-size decode, each HF processor on a batch of 16, each model; no threads of ours."""
    started = time.perf_counter()
    models = direct.load(b.folders, b.tasks, b.settings)
    load_s = time.perf_counter() - started
    paths = list(b.images.paths)
    started = time.perf_counter()
    for batch in batches(paths, b.naive_batch_size):
        pictures = []
        for path in batch:
            with Image.open(path) as image:
                pictures.append(image.convert("RGB"))
        models.infer(models.preprocess(pictures))
    elapsed = time.perf_counter() - started
    details = {"load_s": round(load_s, 2), "batch_size": b.naive_batch_size, **_caption_details(models)}
    del models
    gc.collect()
    return Result("naive", len(paths), elapsed, details)


def model_only(b: Bench) -> Result:
    """The models alone, on tensors decoded and preprocessed beforehand and held in memory."""
    started = time.perf_counter()
    models = direct.load(b.folders, b.tasks, b.settings)
    load_s = time.perf_counter() - started
    side = direct.min_side(models)
    started = time.perf_counter()
    prepared = []
    for batch in batches(list(b.images.paths), b.settings.batch_size):
        pictures = [
            decode(path.read_bytes(), max_pixels=b.settings.max_image_pixels, min_side=side).image for path in batch
        ]
        prepared.append(models.preprocess(pictures))
    prepare_s = time.perf_counter() - started
    started = time.perf_counter()
    for pixels in prepared:
        models.infer(pixels)
    elapsed = time.perf_counter() - started
    details = {
        "load_s": round(load_s, 2),
        "prepare_s": round(prepare_s, 2),
        "batch_size": b.settings.batch_size,
        **_caption_details(models),
    }
    del models, prepared
    gc.collect()
    return Result("model-only", b.images.count, elapsed, details)


def _caption_details(models: direct.DirectModels) -> dict[str, Any]:
    if not models.generated_tokens:
        return {}
    lengths = models.generated_tokens
    return {"caption_tokens_mean": round(sum(lengths) / len(lengths), 1), "max_new_tokens": models.max_new_tokens}


# -- child processes ---------------------------------------------------------------------------------

SUMMARY_NUMBER = r"[│|]?\s*{}\s*[│|]?\s*([\d,]+(?:\.\d+)?)"


def parse_summary(text: str) -> tuple[float, float]:
    """(elapsed seconds, images/s) from the summary table `imagemill annotate` prints."""
    found = {}
    for key, label in (("elapsed", "elapsed"), ("rate", "images/s")):
        match = re.search(SUMMARY_NUMBER.format(re.escape(label)), text)
        if not match:
            raise RuntimeError(f"no {label!r} in the annotate summary:\n{text[-2000:]}")
        found[key] = float(match.group(1).replace(",", ""))
    return found["elapsed"], found["rate"]


def local(b: Bench) -> Result:
    """`imagemill annotate DIR -q` in a child process; the rate over the annotation part of its summary."""
    out = b.scratch / f"{b.models.name}-local.jsonl"
    args = [
        sys.executable,
        "-m",
        "imagemill",
        "annotate",
        str(b.images.folder),
        "--tasks",
        ",".join(b.tasks),
        "--out",
        str(out),
        "-q",
    ]
    started = time.perf_counter()
    result = subprocess.run(args, env=b.child_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    wall = time.perf_counter() - started
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"imagemill annotate exited with {result.returncode}:\n{output[-3000:]}")
    elapsed, rate = parse_summary(output)
    records = sum(1 for _ in out.open())
    out.unlink()
    if records != b.images.count:
        raise RuntimeError(f"annotate wrote {records} records for {b.images.count} images")
    # the summary's elapsed has 0.1 s resolution and its rate 0.1 img/s: use whichever is finer
    seconds = elapsed if elapsed >= rate else b.images.count / rate
    ips = b.images.count / elapsed if elapsed >= rate else rate
    details = {"wall_s": round(wall, 2), "startup_and_load_s": round(wall - seconds, 2)}
    return Result("local", b.images.count, seconds, details, images_per_s=ips)


def distributed(b: Bench) -> Result:
    """submit DIR → private Redis → one `imagemill worker --gpus cpu` → a fresh PostgreSQL database."""
    with distributed_stack(b.scratch, b.env, f"{b.models.name}-distributed", b.images.folder) as stack:
        with QueueWatch(stack.redis_url) as watch:
            done = submit_and_wait(stack, str(b.images.folder), ",".join(b.tasks), b.chunk_size, SUBPROCESS_TIMEOUT_S)
        job = done.job
        rows = record_count(stack.pg_url, job.id)
    if job.state != "done" or job.processed != b.images.count or rows != b.images.count:
        raise RuntimeError(f"job {job.id} ended {job.state} with {job.processed} processed, {rows} rows")
    seconds = job.finished_at - job.started_at
    details = {
        "chunk_size": b.chunk_size,
        "chunks": job.chunks_done,
        "max_queue_depth": watch.max_depth,
        "submit_wall_s": round(done.wall_s, 2),
        "failed": job.failed,
        # where the worker's time went: seconds per image by stage, busy share, starvation, the bound
        "accounting": job.figures.to_document() if job.accounting else None,
    }
    return Result("distributed", job.processed, seconds, details, images_per_s=job.rate)


def worker_memory(b: Bench) -> Result:
    """One worker over `memory_images` images (the set cycled through a manifest); its tree's RSS sampled."""
    manifest = cycling_manifest(b.scratch / f"{b.models.name}-memory.txt", b.images, b.memory_images)
    with distributed_stack(b.scratch, b.env, f"{b.models.name}-memory", b.images.folder) as stack:
        registry = stack.registry

        def progress() -> dict[str, Any]:
            jobs = registry.recent(1)
            job = jobs[0] if jobs else None
            return {"processed": job.processed if job else 0, "started": bool(job and job.started_at)}

        with Sampler(stack.worker_pid(), b.sample_interval, probe=progress) as sampler:
            # --force: the manifest names each file many times, and a repeat must be annotated again,
            # not skipped as already in the sink
            done = submit_and_wait(
                stack, str(manifest), ",".join(b.tasks), b.chunk_size, SUBPROCESS_TIMEOUT_S, "--force"
            )
        peaks = dict(sampler.peaks)
    job = done.job
    if job.state != "done" or job.processed != b.memory_images:
        raise RuntimeError(f"memory job {job.id} ended {job.state} with {job.processed} of {b.memory_images}")
    # judged over the steady run: from the end of the first chunk (models loaded, buffers and
    # allocator pools warmed) to the end; the warm-up is reported on its own
    loaded = [s for s in sampler.samples if s.progress.get("started")]
    steady = [s for s in loaded if s.progress.get("processed", 0) >= min(b.chunk_size, b.memory_images)]
    steady = steady or loaded
    values = [s.rss for s in steady]
    first, last = deciles(values)
    details = {
        "images": job.processed,
        "rate": round(job.rate, 2),
        "loaded_mib": round(loaded[0].rss / MIB, 1) if loaded else None,
        "after_first_chunk_mib": round(steady[0].rss / MIB, 1),
        "first_decile_mib": round(first / MIB, 1),
        "last_decile_mib": round(last / MIB, 1),
        "drift": round(drift(values), 4),
        "peak_mib": round(max(peaks.values()) / MIB, 1),
        "peak_tree_mib": round(max(s.tree for s in sampler.samples) / MIB, 1),
        "samples": len(values),
        "sample_interval_s": b.sample_interval,
        "curve": curve(loaded),
    }
    seconds = job.finished_at - job.started_at
    return Result("memory", job.processed, seconds, details, images_per_s=job.rate)


def producer_memory(scratch: Path, objects: int, chunk_size: int, interval: float) -> dict[str, Any]:
    """List a synthetic manifest of `objects` s3:// URIs and chunk it, in a child process of its own."""
    manifest = synthetic_manifest(scratch / "producer-manifest.txt", objects)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [
        sys.executable,
        "-m",
        "bench.scale.listing",
        str(manifest),
        "--chunk-size",
        str(chunk_size),
        "--interval",
        str(interval),
    ]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, cwd=REPO)
    manifest.unlink()
    if result.returncode != 0:
        raise RuntimeError(f"bench.listing exited with {result.returncode}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def scratch_dir(parent: Path | None = None) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="imagemill-bench-", dir=parent)
