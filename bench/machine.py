"""The machine a benchmark runs on: what it is, and how busy other processes keep its CPUs.

On a shared machine other processes steal cores from a benchmark (and torch's thread pool
degrades badly when its threads are descheduled), so every scenario records `others_cores`: the
CPU the rest of the machine used while it ran, in cores, i.e. machine-wide busy CPU time from
/proc/stat minus this process tree's own (itself and its reaped children), over the wall time.
Before a scenario, `wait_for_idle` can wait for the others to quieten down.
"""

import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import REPO
from bench.memory import descendants, stat_fields

TICK = os.sysconf("SC_CLK_TCK")


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / TICK


def own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended and been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def live_children_cpu_s() -> float:
    """CPU seconds of this process's descendants still running (not yet in os.times())."""
    total = 0.0
    for pid in descendants(os.getpid()):
        if pid == os.getpid():
            continue
        fields = stat_fields(pid)
        if fields is None:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    return total


@dataclass
class Interference:
    """Measures the CPU others used over a block: `with Interference() as i: …; i.others_cores`."""

    others_cores: float = 0.0
    wall_s: float = 0.0
    _start: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))

    def __enter__(self) -> "Interference":
        self._start = (time.monotonic(), busy_cpu_s(), own_cpu_s() + live_children_cpu_s())
        return self

    def __exit__(self, *exc: object) -> None:
        started, busy, own = self._start
        self.wall_s = time.monotonic() - started
        others = (busy_cpu_s() - busy) - (own_cpu_s() + live_children_cpu_s() - own)
        self.others_cores = max(0.0, others / self.wall_s) if self.wall_s > 0 else 0.0


def wait_for_idle(max_cores: float, timeout_s: float, window_s: float = 2.0) -> dict[str, float]:
    """Wait (up to `timeout_s`) until other processes use under `max_cores` over a `window_s` window."""
    started = time.monotonic()
    while True:
        with Interference() as probe:
            time.sleep(window_s)
        waited = time.monotonic() - started
        if probe.others_cores < max_cores or waited >= timeout_s:
            return {"waited_s": round(waited, 1), "others_cores_before": round(probe.others_cores, 2)}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def describe() -> dict[str, Any]:
    # for their versions: a probe that runs no model loads them here, never at import
    import PIL
    import torch
    import transformers

    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "?",
    )
    mem_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "commit": git("rev-parse", "--short", "HEAD") or "?",
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "loadavg_start": loadavg(),
    }
