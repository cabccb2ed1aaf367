"""`bash bench/gpu/check.sh`: imagemill's GPU numbers from one device call, printed as one table.

Builds real-size random-weight models (BLIP-large, ViT-B/16 moderation, CLIP B/32 tags) and
photo-like 1280x960 JPEGs on the device, then measures, each stage under its own time cap: the
CPU draft-decode limit (all cores), the GPU decode rate (nvjpeg alone, and into the models'
inputs), model-only rates, and `imagemill annotate` end to end with GPU utilisation sampled, for
moderation+tags and all three tasks, in fp16 and bf16. `--cpu-smoke` runs the same code on the CPU
with the tiny test models, small counts and short caps (CI runs it).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import save_results

REPO = Path(__file__).resolve().parents[2]
MOD_TAGS = ("moderation", "tags")
ALL_TASKS = ("caption", "moderation", "tags")
SUMMARY = r"[│|]?\s*{}\s*[│|]?\s*([\d,]+(?:\.\d+)?)"


@dataclass(frozen=True)
class Plan:
    """Counts and caps: the device's, or the smoke's (tiny models, CPU, seconds)."""

    smoke: bool
    device: str
    unique_images: int  # distinct JPEGs generated (the runs cycle through them)
    width: int
    height: int
    batch_size: int
    decode_batch: int
    stage_cap_s: float  # each timed loop stops by then
    e2e_seconds: float  # end-to-end runs are sized to take about this long at the model-only rate
    e2e_cap_s: float  # the annotate child is killed after this (load included)
    total_cap_s: float  # stages not started by then are skipped
    dtypes: tuple[str, ...]
    max_new_tokens: int


FULL = Plan(False, "cuda", 512, 1280, 960, 256, 128, 8.0, 10.0, 90.0, 360.0, ("float16", "bfloat16"), 30)
# one dtype on the CPU (no dtype has code of its own), so that every stage runs within the smoke's cap
SMOKE = Plan(True, "cpu", 12, 640, 480, 4, 4, 0.5, 1.5, 60.0, 110.0, ("bfloat16",), 3)


@dataclass
class Row:
    stage: str
    dtype: str = ""
    images_per_s: float | None = None
    ratio: str = ""
    gpu_busy: str = ""
    detail: str = ""


@dataclass
class Check:
    plan: Plan
    work: Path
    started: float = field(default_factory=time.monotonic)
    rows: list[Row] = field(default_factory=list)
    model_only: dict[tuple[str, str], float] = field(default_factory=dict)
    decode_rate: float | None = None  # the device decode path's, into the moderation+tags inputs
    images: list[Path] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    def stage(self, name: str, dtype: str, fn: Callable[[], Row | None]) -> None:
        """Run one stage; a failure or the overall time cap costs that row only."""
        if time.monotonic() - self.started > self.plan.total_cap_s:
            self.rows.append(Row(name, dtype, detail="skipped: the overall time cap was reached"))
            self.say(f"skip {name} {dtype}")
            return
        self.say(f"{name} {dtype} …")
        try:
            row = fn()
        except Exception as exc:  # noqa: BLE001 - the table says what failed; the other stages go on
            traceback.print_exc(file=sys.stderr)
            row = Row(name, dtype, detail=f"failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}")
        if row is not None:
            self.rows.append(row)
            rate = f"{row.images_per_s:,.1f} img/s" if row.images_per_s is not None else row.detail
            self.say(f"{name} {dtype}: {rate}")


# ----------------------------------------------------------------------------- inputs


def _write_photo(args: tuple[Path, int, int, int]) -> Path:
    # in the forked JPEG makers only
    from tests.fixtures.images import photo_jpeg

    folder, index, width, height = args
    path = folder / f"photo_{index:05d}.jpg"
    path.write_bytes(photo_jpeg(width, height, seed=index))
    return path


def make_images(check: Check) -> list[Path]:
    folder = check.work / "images"
    folder.mkdir()
    jobs = [(folder, i, check.plan.width, check.plan.height) for i in range(check.plan.unique_images)]
    with ProcessPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        return list(pool.map(_write_photo, jobs, chunksize=8))


def make_models(check: Check) -> dict[str, Path]:
    # imported where used, as in every stage: a wheel missing on the device costs the row that needs it
    from tests.fixtures import tiny_models as tiny

    root = check.work / "models"
    with tiny.quiet_transformers():
        folders = {
            "caption": tiny.build_caption(root / "tiny-caption"),
            "moderation": tiny.build_moderation(root / "tiny-moderation"),
            "tags": tiny.build_tags_clip(root / "tiny-tags"),
        }
        if check.plan.smoke:
            return folders
        # the real-size builders only for a device run (the smoke builds the tiny set alone)
        from bench.models import build_blip_large, build_clip_b32_tags, build_vit_base_moderation

        return {
            "caption": build_blip_large(root / "blip-large", folders["caption"], check.plan.device),
            "moderation": build_vit_base_moderation(root / "vit-b16-moderation"),
            "tags": build_clip_b32_tags(root / "clip-b32-tags", folders["tags"]),
        }


def settings_for(check: Check, folders: dict[str, Path], dtype: str) -> Any:
    # imported where used: a wheel missing on the device costs the rows that need it, not the check
    from imagemill.core.settings import Settings

    return Settings(
        caption_model=str(folders["caption"]),
        moderation_model=str(folders["moderation"]),
        tags_model=str(folders["tags"]),
        device=check.plan.device,
        dtype=dtype,
        batch_size=check.plan.batch_size,
        caption_max_new_tokens=check.plan.max_new_tokens,
    )


def recipes(folders: dict[str, Path], tasks: tuple[str, ...]) -> tuple[list[Any], int]:
    """The models' input recipes (distinct) and the shortest side they need, as the engine computes them."""
    # imported where used: a wheel missing on the device costs the rows that need it, not the check
    from bench.throughput import direct
    from imagemill.pipeline.prepare.preprocess import from_processor

    processors = direct.load_processors(folders, tasks)
    found = [from_processor(p) for p in processors.values()]
    return list(dict.fromkeys(r for r in found if r is not None)), direct.min_side(processors)


# ----------------------------------------------------------------------------- stages


def cpu_limit(check: Check, blobs: list[bytes], folders: dict[str, Path], tasks: tuple[str, ...]) -> Row:
    """Draft decode alone on every core, over bytes in memory: the ceiling of the CPU decode path."""
    # imported by the stage: a failing import costs this row only
    from imagemill.pipeline.prepare.decode import decode

    _, side = recipes(folders, tasks)
    threads = os.cpu_count() or 1
    deadline = time.monotonic() + check.plan.stage_cap_s
    done, started = 0, time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        while time.monotonic() < deadline:
            list(pool.map(lambda b: decode(b, max_pixels=64_000_000, min_side=side), blobs))
            done += len(blobs)
    rate = done / (time.perf_counter() - started)
    return Row(f"CPU draft-decode limit ({'+'.join(tasks)})", "", rate, detail=f"{threads} threads, min side {side}")


def device_decode(check: Check, blobs: list[bytes], folders: dict[str, Path], tasks: tuple[str, ...] | None) -> Row:
    """Batches through the device decoder: nvjpeg alone (tasks None), or on into the models' inputs."""
    # imported by the stage: a failing import (no torchvision, no nvjpeg) costs this row only
    import torch

    from imagemill.pipeline.prepare.device_decode import DeviceDecoder, default_decoder
    from imagemill.pipeline.prepare.jpeg_header import PendingJpeg, read_header

    device = torch.device(check.plan.device)
    decoder = default_decoder() if device.type == "cpu" else None
    label = "GPU decode" if device.type == "cuda" else "device decode (CPU stand-in)"
    if tasks is None:
        found, side = [], None
    else:
        found, side = recipes(folders, tasks)
    path = DeviceDecoder(device, found, side, decoder)
    pending = []
    for blob in blobs:
        header = read_header(blob, 64_000_000)
        assert header is not None, "a generated photo was refused by the header check"
        pending.append(PendingJpeg(blob, header))
    size = check.plan.decode_batch
    batches = [pending[i : i + size] for i in range(0, len(pending) - size + 1, size)] or [pending]
    path.decode(batches[0])  # nvjpeg's handles and buffers are made on first use
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    deadline = time.monotonic() + check.plan.stage_cap_s
    done, started = 0, time.perf_counter()
    while time.monotonic() < deadline:
        for batch in batches:
            result = path.decode(batch)
            done += len(result.decoded)
            if result.rejected:
                raise RuntimeError(f"the decoder rejected {len(result.rejected)} generated photos")
        sync()
    rate = done / (time.perf_counter() - started)
    if tasks is not None:
        check.decode_rate = min(rate, check.decode_rate or rate)
    what = "bytes -> RGB" if tasks is None else f"-> {'+'.join(tasks)} inputs ({len(found)} recipes)"
    return Row(label, "", rate, detail=f"batches of {size}, {what}")


def model_only(check: Check, folders: dict[str, Path], tasks: tuple[str, ...], dtype: str) -> Row:
    """imagemill's runners on inputs already on the device (Pillow-preprocessed beforehand)."""
    # imported by the stage: a failing import costs this row only
    import numpy as np
    import torch

    from imagemill.core.tasks import Task
    from imagemill.pipeline.models import load_runners
    from imagemill.pipeline.prepare.decode import decode

    settings = settings_for(check, folders, dtype)
    started = time.perf_counter()
    runners = load_runners(settings, tuple(Task(t) for t in tasks))
    load_s = time.perf_counter() - started
    side = max(r.min_side for r in runners)
    pictures = [decode(p.read_bytes(), max_pixels=64_000_000, min_side=side).image for p in check.images[:16]]
    size = check.plan.batch_size
    inputs = []
    for runner in runners:
        arrays = [runner.preprocess(p) for p in pictures]
        inputs.append(runner.batch([arrays[i % len(arrays)] for i in range(size)]))
    device = runners[0].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for runner, batch in zip(runners, inputs, strict=True):  # warm-up: kernels chosen, caches made
        runner.infer(batch)
    sync()
    deadline = time.monotonic() + check.plan.stage_cap_s
    done, started = 0, time.perf_counter()
    while time.monotonic() < deadline or done == 0:
        for runner, batch in zip(runners, inputs, strict=True):
            runner.infer(batch)
        done += size
    sync()
    rate = done / (time.perf_counter() - started)
    check.model_only[(",".join(tasks), dtype)] = rate
    del runners, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _ = np  # numpy is what the runners' inputs were stacked from
    return Row(f"model-only {'+'.join(tasks)}", dtype, rate, detail=f"batch {size}, load {load_s:.1f} s, {done} images")


class BusySampler:
    """GPU utilisation (nvidia-smi, every 0.25 s) with the time of each sample."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
        while not self._stop.is_set():
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.strip()
                self.samples.append((time.monotonic(), float(out.splitlines()[0])))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.25)

    @contextmanager
    def running(self) -> Iterator["BusySampler"]:
        if self.available:
            self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            if self.available:
                self._thread.join()

    def mean_between(self, start: float, end: float) -> float | None:
        inside = [value for at, value in self.samples if start <= at <= end]
        return sum(inside) / len(inside) if inside else None


def end_to_end(check: Check, folders: dict[str, Path], tasks: tuple[str, ...], dtype: str, decode: str = "auto") -> Row:
    """`imagemill annotate MANIFEST` in a child process, sized to run about `e2e_seconds`.

    `decode` is IMAGEMILL_DECODE_DEVICE: auto decodes JPEGs on the GPU (nvjpeg), cpu with Pillow."""
    # imported by the stage: a failing import costs this row only
    from bench.images import ImageSet, cycling_manifest

    plan = check.plan
    base = check.model_only.get((",".join(tasks), dtype))
    # sized by the slower of the two ceilings measured before, so that the run fits its cap
    expected = min(base or 100.0, check.decode_rate or base or 100.0)
    count = int(min(50_000, max(4 * plan.batch_size, expected * plan.e2e_seconds)))
    images = ImageSet(check.work / "images", tuple(check.images), plan.width, plan.height, 0.0)
    manifest = cycling_manifest(check.work / f"e2e-{len(tasks)}-{dtype}.txt", images, count)
    out = check.work / f"e2e-{len(tasks)}-{dtype}.jsonl"
    env = {
        **os.environ,
        "IMAGEMILL_CAPTION_MODEL": str(folders["caption"]),
        "IMAGEMILL_MODERATION_MODEL": str(folders["moderation"]),
        "IMAGEMILL_TAGS_MODEL": str(folders["tags"]),
        "IMAGEMILL_DEVICE": plan.device,
        "IMAGEMILL_DTYPE": dtype,
        "IMAGEMILL_DECODE_DEVICE": decode,
        "IMAGEMILL_BATCH_SIZE": str(plan.batch_size),
        "IMAGEMILL_CAPTION_MAX_NEW_TOKENS": str(plan.max_new_tokens),
        "COLUMNS": "200",
    }
    args = [sys.executable, "-m", "imagemill", "annotate", str(manifest), "--tasks", ",".join(tasks)]
    args += ["--out", str(out), "-q"]
    sampler = BusySampler()
    with sampler.running():
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=plan.e2e_cap_s)
        ended = time.monotonic()
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"imagemill annotate exited with {result.returncode}: {output[-1500:]}")
    found = {}
    for key, label in (("elapsed", "elapsed"), ("rate", "images/s")):
        match = re.search(SUMMARY.format(re.escape(label)), output)
        if not match:
            raise RuntimeError(f"no {label!r} in the annotate summary: {output[-1500:]}")
        found[key] = float(match.group(1).replace(",", ""))
    records = sum(1 for _ in out.open())
    errors = sum(1 for line in out.open() if json.loads(line).get("error"))
    out.unlink()
    if records != count or errors:
        raise RuntimeError(f"annotate wrote {records} records for {count} images, {errors} with errors")
    busy = sampler.mean_between(ended - found["elapsed"], ended)
    ratio = f"{found['rate'] / base:.2f}" if base else ""
    return Row(
        f"end-to-end local {'+'.join(tasks)}" + (", Pillow decode" if decode == "cpu" else ""),
        dtype,
        found["rate"],
        ratio=ratio,
        gpu_busy=f"{busy:.0f} %" if busy is not None else "n/a",
        detail=f"{count} images, {found['elapsed']:.1f} s annotating",
    )


# ----------------------------------------------------------------------------- report


def facts(plan: Plan) -> list[str]:
    # versions for the table's notes, imported where read (as the stages do)
    import PIL
    import torch
    import transformers

    from imagemill.pipeline.prepare.device_decode import nvjpeg_available

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    try:
        # torchvision is optional on the device: its absence is a note, not a failure
        import torchvision

        vision = torchvision.__version__
    except Exception:  # noqa: BLE001 - absent or built for another torch
        vision = "not loadable"
    return [
        f"device: {gpu}; CPUs: {os.cpu_count()}; python {sys.version.split()[0]}",
        f"torch {torch.__version__}, torchvision {vision}, transformers {transformers.__version__}, "
        f"pillow {PIL.__version__}",
        f"nvjpeg decode available: {nvjpeg_available()}; mode: {'cpu smoke (tiny models)' if plan.smoke else 'gpu'}",
        f"images: {plan.unique_images} photo-like {plan.width}x{plan.height} JPEGs (cycled); batch {plan.batch_size}; "
        f"caption max_new_tokens {plan.max_new_tokens}",
    ]


def table(rows: list[Row], notes: list[str]) -> str:
    lines = [f"- {note}" for note in notes] + [
        "",
        "| stage | dtype | images/s | e2e / model-only | GPU busy | detail |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        rate = f"{row.images_per_s:,.1f}" if row.images_per_s is not None else "–"
        lines.append(f"| {row.stage} | {row.dtype} | {rate} | {row.ratio} | {row.gpu_busy} | {row.detail} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu/check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the same stages on the CPU with the tiny models")
    parser.add_argument(
        "--out", type=Path, help="also write the report (<stamp>-gpu.json and .md) here (default: $OUT if set)"
    )
    args = parser.parse_args(argv)
    plan = SMOKE if args.cpu_smoke else FULL
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if not plan.smoke:
        # only a device run needs torch before the stages: to refuse at once without a GPU
        import torch

        if not torch.cuda.is_available():
            print("no CUDA GPU is visible: run with --cpu-smoke on a machine without one", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="imagemill-gpu-check-") as tmp:
        check = Check(plan, Path(tmp))
        # before CUDA is initialised in this process: the generating processes are forked
        check.say(f"generating {plan.unique_images} JPEGs …")
        check.images = make_images(check)
        notes = facts(plan)
        for note in notes:
            check.say(note)
        blobs = [p.read_bytes() for p in check.images]
        check.say("building the models …")
        started = time.perf_counter()
        folders = make_models(check)
        notes.append(
            f"models built in {time.perf_counter() - started:.0f} s: " + ", ".join(p.name for p in folders.values())
        )
        check.say(notes[-1])
        check.stage("CPU draft-decode limit", "", lambda: cpu_limit(check, blobs, folders, MOD_TAGS))
        check.stage("CPU draft-decode limit", "", lambda: cpu_limit(check, blobs, folders, ALL_TASKS))
        check.stage("device decode", "", lambda: device_decode(check, blobs, folders, None))
        check.stage("device decode", "", lambda: device_decode(check, blobs, folders, MOD_TAGS))
        check.stage("device decode", "", lambda: device_decode(check, blobs, folders, ALL_TASKS))
        for tasks in (MOD_TAGS, ALL_TASKS):
            for dtype in plan.dtypes:
                check.stage(
                    f"model-only {'+'.join(tasks)}", dtype, lambda t=tasks, d=dtype: model_only(check, folders, t, d)
                )
                check.stage(
                    f"end-to-end local {'+'.join(tasks)}",
                    dtype,
                    lambda t=tasks, d=dtype: end_to_end(check, folders, t, d),
                )
                if tasks == MOD_TAGS and dtype == plan.dtypes[0]:
                    # for comparison: the same run with the CPU (Pillow) decode path
                    check.stage(
                        "end-to-end local moderation+tags, Pillow decode",
                        dtype,
                        lambda d=dtype: end_to_end(check, folders, MOD_TAGS, d, decode="cpu"),
                    )
        notes.append(f"whole check: {time.monotonic() - check.started:.0f} s")
        text = table(check.rows, notes)
    print(text, flush=True)
    if out is not None:
        name = "gpu-cpu-smoke" if plan.smoke else "gpu"
        save_results(out, name, {"smoke": plan.smoke, "rows": check.rows, "notes": notes}, text)
    failed = [row for row in check.rows if row.detail.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
