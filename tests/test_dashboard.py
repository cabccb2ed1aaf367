"""The Grafana dashboard in deploy/grafana: valid JSON a Grafana imports, and every metric it
queries one that a worker's /metrics exports (a renamed metric must not leave an empty panel)."""

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY
from prometheus_client.registry import Collector

from imagemill.worker import metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "imagemill.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported() -> set[str]:
    """Every series name the worker's registry can serve, and the scrape-time collectors' (`serve` adds them)."""
    collectors: list[Collector] = [REGISTRY, metrics.QueueDepthCollector("redis://127.0.0.1:1/0", ["q"]),
                                   metrics.GpuMemoryCollector()]  # fmt: skip
    names = set()
    for collector in collectors:
        families = collector.collect() if collector is REGISTRY else collector.describe()
        for family in families:
            names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    found += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return found


def test_the_dashboard_is_json_with_unique_panels_each_with_a_query() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    assert all(panel["targets"] and all(t["expr"].strip() for t in panel["targets"]) for panel in dashboard["panels"])
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for shown in ("throughput per task and lane", "stage", "busy share", "cost"):
        assert shown in titles


def test_every_metric_the_dashboard_queries_is_exported_by_the_worker() -> None:
    names = {name for query in queries() for name in re.findall(r"\bimagemill_[a-z_]+\b", query)}
    assert names, "the dashboard queries no imagemill metric"
    missing = sorted(names - exported())
    assert not missing, f"the dashboard queries metrics no worker exports: {missing}"


def test_the_check_above_sees_a_metric_that_is_not_exported() -> None:
    assert "imagemill_cost_total" in exported() and "imagemill_cost_dollars_total" not in exported()
