"""What per-image accounting costs, what it shows, and how well `estimate` predicts from it.

    python -m bench.scale.accounting --count 200 --rounds 3 --out bench/results --plot docs/accounting.png

`--count` photo-like 1280x960 JPEGs (cached) go through the tiny pipeline (every default task, the
test checkpoints: where imagemill's own overhead shows most) in this process, `--rounds` times with
the accounting off (IMAGEMILL_ACCOUNTING=0) and on, alternating; images/s of each, and the
overhead both as the runs' difference and measured directly (the accounting's own calls per image,
timed alone, against the pipeline's seconds per image). Every run with accounting on records its
rate (IMAGEMILL_RATES_FILE, here in the cache) and the next is predicted from those before it, as
`imagemill estimate` does: the estimate's error. The last run's figures (seconds per image by
stage, busy share, starvation, the bounding stage, the cost at --cost-per-hour) go in the report,
and with --plot a picture of the dashboard's panels drawn from them.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import DEFAULT_CACHE, DEFAULT_RESULTS
from bench.images import photo_set
from bench.machine import describe, loadavg
from bench.models import real_set, tiny_set
from bench.report import save_results
from imagemill.core.accounting import MODEL_PREFIX, Accounting, Figures
from imagemill.core.pipeline_key import pipeline_key
from imagemill.core.rates import pooled, predict, read_from_file
from imagemill.core.settings import Settings
from imagemill.core.tasks import DEFAULT_TASKS, Task
from imagemill.local.run import LocalRun


def settings_for(models: Any, rates: Path, accounting: bool, cost_per_hour: float) -> Settings:
    return Settings(
        caption_model=str(models.caption), moderation_model=str(models.moderation), tags_model=str(models.tags),
        device="cpu", caption_max_new_tokens=6, accounting=accounting, rates_file=rates, cost_per_hour=cost_per_hour,
    )  # fmt: skip


def one_run(folder: Path, settings: Settings, out: Path, tasks: tuple[Task, ...] = DEFAULT_TASKS) -> dict[str, Any]:
    run = LocalRun(str(folder), tasks, out, settings, force=True)
    run.load()  # not timed: the run's seconds start at the first listed image
    done = run.run()
    images = sum(done.outcomes.values())
    figures = done.figures or Figures()
    return {
        "images": images,
        "seconds": round(done.seconds, 3),
        "images_per_s": round(images / done.seconds, 3),
        "cost": done.cost,
        "figures": figures.to_document() | {"fields": figures.fields()} if settings.accounting else None,
    }


def direct_cost_per_image(batch_size: int, tasks: int, repeats: int = 200_000) -> float:
    """Seconds the accounting's own calls take per image: 3 adds on the decode threads, then per
    batch one wait, one add per task, the models' total, and per write one `written` (a write of 64)."""
    accounting = Accounting()
    started = time.perf_counter()
    for i in range(repeats):
        t = time.perf_counter()
        accounting.add("read", time.perf_counter() - t)
        accounting.add("decode", time.perf_counter() - t)
        accounting.add("preprocess", time.perf_counter() - t)
        if i % batch_size == 0:
            accounting.starved(time.perf_counter() - t)
            cpu = time.process_time()
            for _ in range(tasks):
                accounting.add(MODEL_PREFIX + "x", time.perf_counter() - t)
            accounting.models(time.perf_counter() - t, time.process_time() - cpu)
        if i % 64 == 0:
            accounting.written(64, time.perf_counter() - t)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale.accounting", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cost-per-hour", type=float, default=2.5, help="the price the report's cost is at")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--plot", type=Path, help="draw the dashboard's panels from this run's figures (PNG)")
    parser.add_argument(
        "--real-count",
        type=int,
        default=0,
        help="also run moderation and tags with the real-size models on this many images: the models bound it",
    )
    args = parser.parse_args()
    images = photo_set(args.cache, args.count, 1280, 960)
    models = tiny_set(args.cache)
    scratch = args.cache / "accounting"
    scratch.mkdir(parents=True, exist_ok=True)
    rates = scratch / "rates.jsonl"
    rates.unlink(missing_ok=True)
    command = "python -m bench.scale.accounting " + " ".join(sys.argv[1:])
    result: dict[str, Any] = {"count": args.count, "cost_per_hour": args.cost_per_hour, "command": command}
    result |= {"machine": describe(), "loadavg_start": loadavg()}
    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        # alternate which goes first: a machine that speeds up or slows down favours neither
        order = (False, True) if round_ % 2 == 0 else (True, False)
        for accounting in order:
            settings = settings_for(models, rates, accounting, args.cost_per_hour)
            predicted = None
            if accounting:
                rate = pooled(read_from_file(rates, pipeline_key(DEFAULT_TASKS, settings)))
                if rate is not None:
                    guess = predict(args.count, rate, 1, None)
                    predicted = {"seconds": guess.seconds, "fastest_s": guess.fastest_s, "slowest_s": guess.slowest_s}
            run = one_run(images.folder, settings, scratch / "out.jsonl")
            run |= {"round": round_, "accounting": accounting, "predicted": predicted}
            if predicted:
                run["estimate_error"] = round(predicted["seconds"] / run["seconds"] - 1, 4)
            runs.append(run)
    result["runs"] = runs
    off = [r["images_per_s"] for r in runs if not r["accounting"]]
    on = [r["images_per_s"] for r in runs if r["accounting"]]
    result["median_images_per_s"] = {"off": statistics.median(off), "on": statistics.median(on)}
    result["overhead_runs"] = round(1 - statistics.median(on) / statistics.median(off), 4)
    per_image_s = statistics.median(r["seconds"] / r["images"] for r in runs)
    direct = direct_cost_per_image(batch_size=Settings().batch_size, tasks=len(DEFAULT_TASKS))
    result["direct"] = {"seconds_per_image": direct, "share_of_pipeline": round(direct / per_image_s, 6)}
    result["estimate_errors"] = [r["estimate_error"] for r in runs if "estimate_error" in r]
    if args.real_count:
        real = real_set(args.cache)
        settings = settings_for(real, scratch / "real-rates.jsonl", True, args.cost_per_hour)
        few = photo_set(args.cache, args.real_count, 1280, 960)
        tasks = (Task.MODERATION, Task.TAGS)
        result["real"] = one_run(few.folder, settings, scratch / "real.jsonl", tasks) | {"tasks": list(tasks)}
    result["loadavg_end"] = loadavg()
    text = report(result)
    save_results(args.out, "accounting", result, text)
    if args.plot:
        plot(result, args.plot)
    print(text)


def report(r: dict[str, Any]) -> str:
    last = next(run for run in reversed(r["runs"]) if run["accounting"])
    figures = last["figures"]
    lines = [
        f"# imagemill benchmark — per-image accounting on {r['count']} images",
        "",
        f"`{r['command']}`",
        "",
        f"Machine: {r['machine'].get('cpus')} CPUs, commit {r['machine'].get('commit')}. Load average"
        f" {r['loadavg_start']} at the start, {r['loadavg_end']} at the end. Tiny pipeline (caption, moderation,"
        " tags; 6 caption tokens), 1280x960 JPEGs, in one process; model loading not timed.",
        "",
        "| round | accounting | images/s | s | predicted s (from the runs before) | error |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for run in r["runs"]:
        guess = run.get("predicted")
        shown = f"{guess['seconds']:.1f} ({guess['fastest_s']:.1f}–{guess['slowest_s']:.1f})" if guess else "–"
        error = f"{run['estimate_error']:+.1%}" if "estimate_error" in run else "–"
        lines.append(
            f"| {run['round']} | {'on' if run['accounting'] else 'off'} | {run['images_per_s']:.2f} |"
            f" {run['seconds']:.1f} | {shown} | {error} |"
        )
    direct = r["direct"]
    lines += [
        "",
        f"**Overhead.** Median images/s off {r['median_images_per_s']['off']:.2f}, on"
        f" {r['median_images_per_s']['on']:.2f}: {r['overhead_runs']:+.2%} between the runs (a shared 2-core"
        f" machine moves more than that between runs). Measured directly, the accounting's own calls take"
        f" {direct['seconds_per_image'] * 1e6:.2f} µs per image, **{direct['share_of_pipeline']:.3%}** of the"
        " pipeline's time per image (goal: under 1 %).",
        "",
        "**Estimate.** Each run with accounting on was predicted from the rates recorded by those before it"
        f" (as `imagemill estimate` does): errors {', '.join(f'{e:+.1%}' for e in r['estimate_errors']) or '–'}"
        " (goal: within 30 %).",
        "",
        f"**The last run's figures** ({figures['images']} images, {figures['wall_s']:.1f} s):",
        "",
        "| stage | ms per image |",
        "| --- | ---: |",
    ]
    lines += [f"| {name} | {seconds * 1000:.2f} |" for name, seconds in figures["seconds_per_image"].items()]
    lines += [
        "",
        f"Busy share (CPU: the models' share of the process's CPU) {figures['accelerator_busy_ratio']:.1%};"
        f" the models waited for input {figures['starvation_s']:.1f} s ({figures['starved_ratio']:.1%} of the"
        f" wall). Verdict: {figures['bound']}. Cost at {r['cost_per_hour']:.2f} per hour:"
        f" {last['cost']:.5f}, {last['cost'] * 1000 / last['images']:.4f} per 1,000 images.",
    ]
    if "real" in r:
        real = r["real"]["figures"]
        lines += [
            "",
            f"**Real-size models** (moderation ViT-B/16 and tags CLIP ViT-B/32, random weights;"
            f" {real['images']} images): the models waited for input {real['starvation_s']:.1f} s"
            f" ({real['starved_ratio']:.1%} of the wall), busy share {real['accelerator_busy_ratio']:.1%}."
            f" Verdict: {real['bound']}.",
        ]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> None:
    """The dashboard's four kinds of panel, drawn from this run's figures (matplotlib, no display)."""
    import matplotlib  # only for --plot: a dev dependency, not the bench's

    matplotlib.use("Agg")
    from matplotlib import pyplot  # after choosing the headless backend

    runs = [run for run in r["runs"] if run["accounting"]]
    last = runs[-1]
    figures = last["figures"]
    figure, ((throughput, stages), (shares, money)) = pyplot.subplots(2, 2, figsize=(12, 7.5))
    figure.suptitle(f"imagemill — tiny pipeline, {r['count']} 1280x960 JPEGs, CPU (python -m bench.scale.accounting)")
    rounds = [run["round"] for run in runs]
    # every image goes through the three tasks: one line per task would be the same line three times
    throughput.plot(rounds, [run["images_per_s"] for run in runs], marker="o", label="caption · moderation · tags")
    throughput.set(title="Throughput per task and lane (queue imagemill)", xlabel="round", ylabel="images/s")
    throughput.set_xticks(rounds)
    throughput.legend()
    per_image = figures["seconds_per_image"]
    names = [name.removeprefix(MODEL_PREFIX) for name in per_image]
    stages.barh(names, [seconds * 1000 for seconds in per_image.values()], color="tab:blue")
    stages.invert_yaxis()
    stages.set(title="Seconds per image by stage", xlabel="ms per image")
    wall = figures["wall_s"]
    split = {
        "waiting for input": figures["starvation_s"] / wall,
        "models": figures["model_s"] / wall,
        "write": figures["stage_seconds"].get("write", 0.0) / wall,
    }
    shares.bar(list(split), list(split.values()), color=["tab:red", "tab:green", "tab:gray"])
    shares.axhline(figures["accelerator_busy_ratio"], color="black", linestyle="--", label="busy share (CPU)")
    shares.set(title="Busy share and starvation (share of wall time)", ylim=(0, 1))
    shares.legend(loc="upper right")
    shares.text(0.02, 0.80, figures["bound"].split(",")[0].split(";")[0], transform=shares.transAxes)
    per_thousand = [run["cost"] * 1000 / run["images"] for run in runs]
    money.bar([str(x) for x in rounds], per_thousand, color="tab:orange")
    money.set(title=f"Cost per 1,000 images at {r['cost_per_hour']:.2f} per hour", xlabel="round", ylabel="cost")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
