"""What IMAGEMILL_IMAGE_QUALITY costs: the image statistics beside the tiny pipeline's time.

    python -m bench.scale.quality --count 200 --out bench/results

`--count` photo-like 1280x960 JPEGs (cached) are annotated by the tiny pipeline (the test
checkpoints: where imagemill's own overhead shows most, so any added cost shows most) with every
default task, in this process, twice: without and with the statistics; CPU seconds and wall time of
each. Then the statistics alone: each image decoded as the pipeline decodes it for those models
(the same reduced size), and `image_quality` timed on the pictures: its cost per image against the
pipeline's CPU per image. Goal: under 5 %.
"""

import argparse
import os
import time
from pathlib import Path
from typing import Any

from bench import DEFAULT_CACHE, DEFAULT_RESULTS
from bench.images import photo_set
from bench.machine import describe, loadavg
from bench.models import tiny_set
from bench.report import save_results
from imagemill.core.settings import Settings
from imagemill.core.tasks import DEFAULT_TASKS
from imagemill.local.run import LocalRun
from imagemill.pipeline.prepare.decode import decode
from imagemill.pipeline.prepare.quality import image_quality


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def pipeline(folder: Path, models: Any, out: Path, quality: bool) -> dict[str, Any]:
    settings = Settings(
        caption_model=str(models.caption), moderation_model=str(models.moderation), tags_model=str(models.tags),
        device="cpu", caption_max_new_tokens=6, image_quality=quality,
    )  # fmt: skip
    run = LocalRun(str(folder), DEFAULT_TASKS, out, settings, force=True)
    run.load()
    started, cpu = time.perf_counter(), _cpu_s()
    done = run.run()
    return {
        "images": sum(done.outcomes.values()),
        "wall_s": round(time.perf_counter() - started, 2),
        "cpu_s": round(_cpu_s() - cpu, 2),
        "min_side": run.engine.prefetcher.min_side if hasattr(run.engine, "prefetcher") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    images = photo_set(args.cache, args.count, 1280, 960)
    models = tiny_set(args.cache)
    scratch = args.cache / "quality"
    scratch.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"count": args.count, "machine": describe(), "loadavg_start": loadavg()}
    result["off"] = pipeline(images.folder, models, scratch / "off.jsonl", quality=False)
    result["on"] = pipeline(images.folder, models, scratch / "on.jsonl", quality=True)
    min_side = result["off"]["min_side"]
    pictures = [decode(path.read_bytes(), max_pixels=64_000_000, min_side=min_side).image for path in images.paths]
    started, cpu = time.perf_counter(), _cpu_s()
    for picture in pictures:
        image_quality(picture)
    result["statistics"] = {
        "pictures": len(pictures),
        "size": list(pictures[0].size),
        "ms_per_image": round((time.perf_counter() - started) * 1000 / len(pictures), 3),
        "cpu_ms_per_image": round((_cpu_s() - cpu) * 1000 / len(pictures), 3),
    }
    per_image = result["off"]["cpu_s"] * 1000 / result["off"]["images"]
    result["share_of_pipeline_cpu"] = round(result["statistics"]["cpu_ms_per_image"] / per_image, 4)
    result["loadavg_end"] = loadavg()
    text = report(result)
    save_results(args.out, "quality", result, text)
    print(text)


def report(r: dict[str, Any]) -> str:
    off, on, stats = r["off"], r["on"], r["statistics"]
    return (
        "\n".join(
            [
                f"# imagemill benchmark — image statistics (IMAGEMILL_IMAGE_QUALITY) on {r['count']} images",
                "",
                f"`python -m bench.scale.quality --count {r['count']}`",
                "",
                f"Machine: {r['machine'].get('cpus')} CPUs, commit {r['machine'].get('commit')}. Load average"
                f" {r['loadavg_start']} at the start, {r['loadavg_end']} at the end.",
                "",
                "| tiny pipeline, caption + moderation + tags | images | wall s | CPU s | CPU ms / image |",
                "| --- | ---: | ---: | ---: | ---: |",
                f"| statistics off | {off['images']} | {off['wall_s']} | {off['cpu_s']} |"
                f" {off['cpu_s'] * 1000 / off['images']:.2f} |",
                f"| statistics on | {on['images']} | {on['wall_s']} | {on['cpu_s']} |"
                f" {on['cpu_s'] * 1000 / on['images']:.2f} |",
                "",
                f"The statistics alone, on the pictures as the pipeline decodes them for these models"
                f" ({stats['size'][0]}x{stats['size'][1]}): {stats['cpu_ms_per_image']} CPU ms per image,"
                f" **{r['share_of_pipeline_cpu']:.2%}** of the pipeline's CPU per image (goal: under 5 %). The two"
                " runs' difference is within what a shared machine moves between runs; the direct measure is the one"
                " to read.",
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
