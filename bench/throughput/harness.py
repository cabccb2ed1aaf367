"""`python -m bench`: generate images, build model sets, run the scenarios, write the report.

    python -m bench --count 400 --size 1280x960 --models tiny \
        --scenarios limit,naive,model-only,local,distributed,memory --out bench/results
"""

import os

# before anything imports transformers: benchmarks never reach the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from bench import DEFAULT_CACHE, DEFAULT_RESULTS
from bench.images import parse_size, photo_set
from bench.machine import Interference, describe, loadavg, wait_for_idle
from bench.models import MODEL_SETS, model_set
from bench.throughput import report, scenarios
from imagemill.core.redaction import redact_url
from imagemill.core.settings import get_settings

SCENARIOS = ("limit", "naive", "model-only", "local", "distributed", "memory")
RUNNERS = {
    "limit": scenarios.limit,
    "naive": scenarios.naive,
    "model-only": scenarios.model_only,
    "local": scenarios.local,
    "distributed": scenarios.distributed,
    "memory": scenarios.worker_memory,
}
TASKS = ("caption", "moderation", "tags")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="imagemill throughput benchmarks")
    parser.add_argument("--count", type=int, default=400, help="images to generate and annotate (default 400)")
    parser.add_argument("--size", default="1280x960", help="image size, WIDTHxHEIGHT (default 1280x960)")
    parser.add_argument("--models", choices=(*MODEL_SETS, "both"), default="tiny", help="model set(s) (default tiny)")
    parser.add_argument("--real-count", type=int, help="images for the real set when --models both (default --count)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of: {','.join(SCENARIOS)}")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: caption, moderation, tags")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="report folder (default bench/results)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="images and models (default bench/.cache)")
    parser.add_argument(
        "--batch-size", type=int, help="images per model batch (default: the setting, IMAGEMILL_BATCH_SIZE)"
    )
    parser.add_argument("--max-new-tokens", type=int, help="caption length bound (default: the setting, 30)")
    parser.add_argument("--naive-batch-size", type=int, default=16, help="the naive loop's batch (default 16)")
    parser.add_argument(
        "--limit-repeats", type=int, default=3, help="decode passes in `limit`; the best counts (default 3)"
    )
    parser.add_argument("--chunk-size", type=int, help="images per distributed chunk (default: the setting, 128)")
    parser.add_argument(
        "--memory-images", type=int, default=10_000, help="images through the worker in `memory` (default 10000)"
    )
    parser.add_argument(
        "--memory-models", help="model sets `memory` runs the worker with (default: tiny with --models both)"
    )
    parser.add_argument(
        "--producer-objects",
        type=int,
        default=1_000_000,
        help="objects the producer lists in `memory` (default 1000000)",
    )
    parser.add_argument("--sample-interval", type=float, default=0.5, help="seconds between RSS samples (default 0.5)")
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=300.0,
        help="before each scenario, wait up to this many seconds for other processes to leave the CPUs "
        "(default 300; 0: never wait)",
    )
    parser.add_argument(
        "--idle-cores",
        type=float,
        default=0.25,
        help="the machine counts as idle when others use under this many cores (default 0.25)",
    )
    parser.add_argument("--rebuild-models", action="store_true", help="rebuild the cached checkpoints")
    args = parser.parse_args(argv)
    args.width, args.height = parse_size(args.size)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(args.scenario_list) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    args.task_list = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if not args.task_list or set(args.task_list) - set(TASKS):
        parser.error(f"--tasks takes some of {', '.join(TASKS)}")
    args.sets = list(MODEL_SETS) if args.models == "both" else [args.models]
    default_memory = "tiny" if args.models == "both" else args.models
    args.memory_sets = [s.strip() for s in (args.memory_models or default_memory).split(",") if s.strip()]
    if args.count < 1 or args.memory_images < 1 or args.producer_objects < 1:
        parser.error("counts must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    log = Console(stderr=True)
    base = get_settings()
    overrides = {
        "batch_size": args.batch_size or base.batch_size,
        "caption_max_new_tokens": args.max_new_tokens or base.caption_max_new_tokens,
        "chunk_size": args.chunk_size or base.chunk_size,
        "device": "cpu",
    }
    cache, out = args.cache.resolve(), args.out.resolve()
    created = time.time()
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(created)),
        "created_epoch": created,
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "models": args.models,
        "machine": describe(),
        "options": {
            "tasks": list(args.task_list),
            "batch_size": overrides["batch_size"],
            "naive_batch_size": args.naive_batch_size,
            "max_new_tokens": overrides["caption_max_new_tokens"],
            "chunk_size": overrides["chunk_size"],
            "scenarios": args.scenario_list,
            "memory_images": args.memory_images,
            "producer_objects": args.producer_objects,
            "sample_interval_s": args.sample_interval,
            "idle_wait_s": args.idle_wait,
            "idle_cores": args.idle_cores,
        },
        "environment": ambient_settings(),
        "sets": {},
        "producer_memory": None,
    }
    failures = 0
    with scenarios.scratch_dir() as tmp:
        scratch = Path(tmp)
        for set_name in args.sets:
            count = args.real_count if set_name == "real" and args.real_count else args.count
            log.print(f"[bold]{set_name}[/]: {count} images of {args.size} …")
            images = photo_set(cache, count, args.width, args.height)
            result.setdefault("images", image_facts(images, args.size))
            models = model_set(set_name, cache, args.rebuild_models)
            env = {
                **models.env(),
                "IMAGEMILL_BATCH_SIZE": str(overrides["batch_size"]),
                "IMAGEMILL_CAPTION_MAX_NEW_TOKENS": str(overrides["caption_max_new_tokens"]),
                "IMAGEMILL_CHUNK_SIZE": str(overrides["chunk_size"]),
                "IMAGEMILL_DEVICE": "cpu",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            }
            settings = base.model_copy(
                update={
                    **overrides,
                    "caption_model": str(models.caption),
                    "moderation_model": str(models.moderation),
                    "tags_model": str(models.tags),
                }
            )
            bench = scenarios.Bench(
                images,
                models,
                args.task_list,
                settings,
                env,
                scratch,
                overrides["chunk_size"],
                args.memory_images,
                args.producer_objects,
                args.sample_interval,
                args.naive_batch_size,
                args.limit_repeats,
            )
            section: dict[str, Any] = {
                "description": models.description,
                "images": image_facts(images, args.size),
                "build_s": round(models.build_s, 1),
                "scenarios": {},
            }
            for name in args.scenario_list:
                if name == "memory" and set_name not in args.memory_sets:
                    continue
                log.print(f"  {set_name}/{name} …", end=" ")
                section["scenarios"][name] = outcome = run_scenario(name, bench, args)
                failures += "error" in outcome
                log.print(
                    outcome.get("error", "").splitlines()[0]
                    if "error" in outcome
                    else f"{outcome['images_per_s']:,.2f} images/s (others used {outcome['others_cores']:.2f} cores)"
                )
            section["ratios"] = report.ratios_for(set_name, section["scenarios"])
            result["sets"][set_name] = section
        if "memory" in args.scenario_list:
            log.print(f"producer listing {args.producer_objects:,} objects …", end=" ")
            try:
                idle = wait_for_idle(args.idle_cores, args.idle_wait) if args.idle_wait > 0 else {}
                with Interference() as others:
                    result["producer_memory"] = scenarios.producer_memory(
                        scratch, args.producer_objects, overrides["chunk_size"], min(args.sample_interval, 0.2)
                    )
                result["producer_memory"].update(idle, others_cores=round(others.others_cores, 2))
                log.print(f"{result['producer_memory']['objects_per_s']:,.0f} objects/s")
            except Exception as exc:  # noqa: BLE001 - a failed measurement is reported, the other results kept
                failures += 1
                result["producer_memory"] = {"error": f"{type(exc).__name__}: {exc}"}
                log.print(traceback.format_exc())
    result["machine"]["loadavg_end"] = loadavg()
    result["memory_checks"] = report.memory_checks(result)
    report.print_report(result, Console(width=max(Console().width, 140)))
    json_path, md_path = report.write(result, out)
    log.print(f"report: {json_path} and {md_path}")
    return 1 if failures else 0


def run_scenario(name: str, bench: scenarios.Bench, args: argparse.Namespace) -> dict[str, Any]:
    """One scenario, with how busy the rest of the machine was before and while it ran."""
    idle = wait_for_idle(args.idle_cores, args.idle_wait) if args.idle_wait > 0 else {}
    context = {**idle, "loadavg": loadavg()}
    try:
        with Interference() as others:
            outcome = asdict(RUNNERS[name](bench))
    except (Exception, pytest.fail.Exception) as exc:  # noqa: BLE001 - reported; the other scenarios still run
        # pytest.fail.Exception too: fresh_database fails with pytest's outcome, which is no Exception
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}", **context}
    outcome.pop("scenario")
    outcome["seconds"] = round(outcome["seconds"], 3)
    outcome["images_per_s"] = round(outcome["images_per_s"], 3)
    return {**outcome, **context, "others_cores": round(others.others_cores, 2)}


def ambient_settings() -> dict[str, str]:
    """IMAGEMILL_* variables this run inherited (they reach every child process); URLs redacted."""
    return {
        key: redact_url(value) if "://" in value else value
        for key, value in sorted(os.environ.items())
        if key.startswith("IMAGEMILL_")
    }


def image_facts(images, size: str) -> dict[str, Any]:
    return {
        "count": images.count,
        "size": size,
        "mean_kib": round(images.total_bytes / images.count / 1024, 1),
        "folder": str(images.folder),
        "generate_s": round(images.generate_s, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
