"""The benchmark harness runs end to end on a few small images and writes its report.

No timing assertions: speed goals are judged by the benchmark's report, never by tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import REPO

pytestmark = pytest.mark.slow  # runs every benchmark scenario, distributed included

SCENARIOS = ("limit", "naive", "model-only", "local", "distributed")


def test_bench_writes_a_report_with_a_rate_for_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--count",
            "8",
            "--size",
            "320x240",
            "--models",
            "tiny",
            "--scenarios",
            ",".join(SCENARIOS),
            "--out",
            str(out),
            "--cache",
            str(tmp_path / "cache"),
            "--idle-wait",
            "0",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = sorted(out.glob("*-tiny.json"))
    assert len(reports) == 1 and reports[0].with_suffix(".md").is_file(), list(out.iterdir())
    report = json.loads(reports[0].read_text())
    scenarios = report["sets"]["tiny"]["scenarios"]
    assert set(scenarios) == set(SCENARIOS)
    for name in SCENARIOS:
        assert "error" not in scenarios[name], scenarios[name]
        assert scenarios[name]["images"] == 8, name
        assert scenarios[name]["images_per_s"] > 0, name
    ratios = {row["ratio"] for row in report["sets"]["tiny"]["ratios"]}
    assert {"local / limit", "local / naive", "distributed / local"} <= ratios


def test_dedup_bench_finds_the_planted_pairs_and_writes_its_report(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.scale.dedup", "--records", "600", "--sweep", "300", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (report,) = tmp_path.glob("*-dedup.json")
    figures = json.loads(report.read_text())
    assert figures["groups_as_planted"] and figures["groups"] == 12
    assert set(figures["sweep"]) == {"records", "512", "1024", "2048", "4096", "8192"}
    assert "Extrapolated to 1,000,000 records" in (tmp_path / report.name.replace(".json", ".md")).read_text()
