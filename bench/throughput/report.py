"""The throughput harness's report: ratios against the targets, a Rich table, and its Markdown (written
with the JSON by `bench.report.save_results`).

Targets are benchmarks, never timed tests: they are judged here, on the machine that ran them.
"""

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.report import save_results

SCENARIO_ORDER = ("limit", "naive", "model-only", "local", "distributed", "memory")


@dataclass(frozen=True)
class Ratio:
    name: str
    numerator: str
    denominator: str
    target: float | None  # at least this much; None: shown for information
    applies_to: tuple[str, ...]  # model sets the target is set for


RATIOS = (
    Ratio("local / limit", "local", "limit", 0.80, ("tiny",)),
    Ratio("local / naive", "local", "naive", 5.0, ("tiny",)),
    Ratio("local / model-only", "local", "model-only", 0.92, ("real",)),
    Ratio("distributed / local", "distributed", "local", 0.70, ("tiny", "real")),
    Ratio("model-only / limit", "model-only", "limit", None, ()),
)
RSS_DRIFT_TARGET = 0.05  # flat within ±5 %
WORKER_IMAGES_TARGET = 10_000
PRODUCER_OBJECTS_TARGET = 1_000_000


def mark(ok: bool | None) -> str:
    return {True: "✓ pass", False: "✗ FAIL", None: "–"}[ok]


def ratios_for(set_name: str, scenarios: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for ratio in RATIOS:
        top, bottom = scenarios.get(ratio.numerator, {}), scenarios.get(ratio.denominator, {})
        if not top.get("images_per_s") or not bottom.get("images_per_s"):
            continue
        value = top["images_per_s"] / bottom["images_per_s"]
        target = ratio.target if set_name in ratio.applies_to else None
        rows.append(
            {
                "ratio": ratio.name,
                "value": round(value, 3),
                "target": target,
                "pass": None if target is None else value >= target,
            }
        )
    return rows


def memory_checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Worker RSS drift per model set, and the producer's, against ±5 %."""
    checks = []
    for name, section in report["sets"].items():
        memory = section["scenarios"].get("memory", {})
        details = memory.get("details")
        if details:
            ok = abs(details["drift"]) <= RSS_DRIFT_TARGET
            checks.append(
                {
                    "check": f"{name}: worker RSS drift over {details['images']:,} images",
                    "value": details["drift"],
                    "target": f"±{RSS_DRIFT_TARGET:.0%}"
                    + (
                        ""
                        if details["images"] >= WORKER_IMAGES_TARGET
                        else f" (target run: {WORKER_IMAGES_TARGET:,} images)"
                    ),
                    "pass": ok,
                }
            )
    producer = report.get("producer_memory")
    if producer and "drift" in producer:
        checks.append(
            {
                "check": f"producer RSS drift listing {producer['objects']:,} objects",
                "value": round(producer["drift"], 4),
                "target": f"±{RSS_DRIFT_TARGET:.0%}"
                + (
                    ""
                    if producer["objects"] >= PRODUCER_OBJECTS_TARGET
                    else f" (target run: {PRODUCER_OBJECTS_TARGET:,})"
                ),
                "pass": abs(producer["drift"]) <= RSS_DRIFT_TARGET,
            }
        )
    return checks


def worker_memory_line(d: dict[str, Any]) -> str:
    return (
        f"the Celery pool process's RSS was {d['loaded_mib']:,} MiB with the models loaded, "
        f"{d['after_first_chunk_mib']:,} MiB after the first chunk, {d['first_decile_mib']:,} / "
        f"{d['last_decile_mib']:,} MiB over the first / last tenth of the steady run ({d['samples']} samples), "
        f"peak {d['peak_mib']:,} MiB (VmHWM); the whole tree (supervisor + Celery main + pool, summed RSS) "
        f"peaked at {d['peak_tree_mib']:,} MiB."
    )


def short_details(details: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in details.items() if k != "curve")


COLUMNS = ("scenario", "images", "s", "images/s", "others' cores", "details")


def scenario_rows(section: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for name in SCENARIO_ORDER:
        result = section["scenarios"].get(name)
        if result is None:
            continue
        if "error" in result:
            rows.append((name, "–", "–", "error", "–", result["error"].splitlines()[0][:160]))
            continue
        rows.append(
            (
                name,
                f"{result['images']:,}",
                f"{result['seconds']:.2f}",
                f"{result['images_per_s']:,.2f}",
                f"{result['others_cores']:.2f}",
                short_details(result["details"]),
            )
        )
    return rows


def print_report(report: dict[str, Any], console: Console) -> None:
    for name, section in report["sets"].items():
        table = Table(
            title=f"{name} models — {report['images']['count']:,} images {report['images']['size']}",
            title_justify="left",
        )
        for column in COLUMNS:
            table.add_column(column, justify="left" if column in ("scenario", "details") else "right", overflow="fold")
        for row in scenario_rows(section):
            table.add_row(*row)
        console.print(table)
        if section["ratios"]:
            ratios = Table(title=f"{name}: ratios", title_justify="left")
            for column in ("ratio", "value", "target", "result"):
                ratios.add_column(column)
            for row in section["ratios"]:
                target = f"≥ {row['target']:g}" if row["target"] is not None else "–"
                ratios.add_row(row["ratio"], f"{row['value']:.3f}", target, mark(row["pass"]))
            console.print(ratios)
    if report["memory_checks"] or report.get("producer_memory"):
        memory = Table(title="memory", title_justify="left")
        for column in ("check", "value", "target", "result"):
            memory.add_column(column)
        for row in report["memory_checks"]:
            memory.add_row(row["check"], f"{row['value']:+.2%}", row["target"], mark(row["pass"]))
        console.print(memory)
        for name, section in report["sets"].items():
            details = section["scenarios"].get("memory", {}).get("details")
            if details:
                console.print(f"{name} worker: {worker_memory_line(details)}")
        producer = report.get("producer_memory")
        if producer and "start_mib" in producer:
            console.print(
                f"producer (others used {producer.get('others_cores', 0):.2f} cores): "
                f"start {producer['start_mib']:.1f} MiB, peak {producer['peak_mib']:.1f} MiB, "
                f"end {producer['end_mib']:.1f} MiB, {producer['objects_per_s']:,.0f} objects/s"
            )


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# imagemill benchmark — {report['models']} models, {report['created']}",
        "",
        f"`{report['command']}`",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB, torch {m['torch']} "
        f"({m['torch_threads']} threads), transformers {m['transformers']}, Pillow {m['pillow']}, "
        f"commit {m['commit']}{' (working tree modified)' if m['dirty'] else ''}. "
        f"Load average {m['loadavg_start']} at the start, {m['loadavg_end']} at the end.",
        "",
        *(
            [f"Inherited settings: {', '.join(f'{k}={v}' for k, v in report['environment'].items())}.", ""]
            if report.get("environment")
            else []
        ),
        "*others' cores*: the CPU that processes outside this benchmark used while a scenario ran "
        f"(of {m['cpus']}); numbers taken beside a busy machine are low and noisy.",
        "",
        f"Images: {report['images']['count']:,} photo-like JPEGs of {report['images']['size']} "
        f"(mean {report['images']['mean_kib']:,.0f} KiB). Tasks: {', '.join(report['options']['tasks'])}; "
        f"batch size {report['options']['batch_size']} (naive: {report['options']['naive_batch_size']}), "
        f"caption max_new_tokens {report['options']['max_new_tokens']}, chunk size {report['options']['chunk_size']}.",
        "",
    ]
    for name, section in report["sets"].items():
        lines += [
            f"## {name} models",
            "",
            section["description"],
            "",
            "| " + " | ".join(COLUMNS) + " |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        lines += [f"| {' | '.join(row)} |" for row in scenario_rows(section)]
        if section["ratios"]:
            lines += ["", "| ratio | value | target | result |", "| --- | ---: | --- | --- |"]
            for row in section["ratios"]:
                target = f"≥ {row['target']:g}" if row["target"] is not None else "–"
                lines.append(f"| {row['ratio']} | {row['value']:.3f} | {target} | {mark(row['pass'])} |")
        lines.append("")
    if report["memory_checks"]:
        lines += ["## memory", "", "| check | value | target | result |", "| --- | ---: | --- | --- |"]
        for row in report["memory_checks"]:
            lines.append(f"| {row['check']} | {row['value']:+.2%} | {row['target']} | {mark(row['pass'])} |")
        lines.append("")
        for name, section in report["sets"].items():
            details = section["scenarios"].get("memory", {}).get("details")
            if details:
                lines.append(f"- {name} worker: {worker_memory_line(details)}")
        producer = report.get("producer_memory")
        if producer and "start_mib" in producer:
            lines.append(
                f"- producer listing {producer['objects']:,} objects: start {producer['start_mib']:.1f} MiB, "
                f"peak {producer['peak_mib']:.1f} MiB, end {producer['end_mib']:.1f} MiB "
                f"({producer['objects_per_s']:,.0f} objects/s)."
            )
        lines.append("")
    return "\n".join(lines)


def write(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """The report as `<stamp>-<models>.json` and `.md` in `out`, stamped with the run's start."""
    when = datetime.fromtimestamp(report["created_epoch"], UTC)
    md_path = save_results(out, report["models"], report, markdown(report), when)
    return md_path.with_suffix(".json"), md_path
