"""Resident memory from /proc: one process, a process tree, and the one sampler thread over time.

RSS is read from `/proc/<pid>/statm` (cheap enough to sample every fraction of a second); a tree
is a process and all its descendants, found through the parent ids in `/proc/*/stat`. Each sample
keeps the tree's summed RSS and the RSS of its leaves: for `imagemill worker --gpus cpu`
(supervisor ▸ Celery main ▸ one pool process) the leaf is the pool process that loads the models
and annotates. Summed RSS counts the pages a forked child shares with its parent twice, so growth
is judged on the leaf. (PSS would split shared pages, but also with unrelated processes mapping the
same libraries, so it moves when they start or stop; it is not used.)
"""

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def rss(pid: int) -> int | None:
    """Resident bytes of one process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


def pss(pid: int) -> int | None:
    """Proportional set size of one process (a page shared by n processes counts 1/n: forked
    processes sharing their parent's memory are not counted again), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        return None
    return None


def tree_pss(pid: int) -> int | None:
    """Summed PSS of `pid` and its descendants (what the tree holds), or None once it is gone."""
    sizes = [size for member in descendants(pid) if (size := pss(member)) is not None]
    return sum(sizes) if sizes else None


def peak_rss(pid: int) -> int | None:
    """The process's own high-water mark of resident memory (VmHWM), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def descendants(pid: int) -> dict[int, int]:
    """`pid` and every process below it, each with its number of children."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = stat_fields(entry.name)
        if fields is None:
            continue
        ppid = int(fields[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = {}, [pid]
    while todo:
        current = todo.pop()
        tree[current] = len(children.get(current, ()))
        todo.extend(children.get(current, ()))
    return tree


def tree_rss(pid: int) -> tuple[int, int, list[int]]:
    """Summed RSS of the tree under `pid`, summed RSS of its leaves, and the living members."""
    members = descendants(pid)
    each = {p: r for p in members if (r := rss(p)) is not None}
    leaves = sum(r for p, r in each.items() if members[p] == 0)
    return sum(each.values()), leaves, list(each)


@dataclass
class Sample:
    t: float  # seconds since the sampler started
    tree: int  # bytes: summed RSS of the whole tree
    rss: int  # bytes: summed RSS of the tree's leaves (the process itself when it has no children)
    progress: dict[str, Any] = field(default_factory=dict)


class Sampler:
    """The RSS of a process over a stretch of work, sampled every `interval` seconds on a thread (with
    an optional progress probe): of its whole tree (`tree`, the default; VmHWM per member too), or of
    the process alone, which reads one file per sample; or (`proportional`) its tree's summed PSS,
    for children forked from it that share its pages. Without a pid, this process."""

    def __init__(
        self,
        pid: int | None = None,
        interval: float = 0.02,
        probe: Callable[[], dict[str, Any]] | None = None,
        tree: bool = True,
        proportional: bool = False,
    ) -> None:
        self.pid, self.interval, self.probe, self.tree = pid or os.getpid(), interval, probe, tree
        self.proportional = proportional  # the tree's summed PSS instead (forked children sharing pages)
        self.samples: list[Sample] = []
        self.peaks: dict[int, int] = {}  # VmHWM per process seen (tree sampling only)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._started = time.monotonic()

    @property
    def peak(self) -> int:
        """The largest RSS sampled (of the leaves, for a tree), in bytes."""
        return max((s.rss for s in self.samples), default=0)

    def __enter__(self) -> "Sampler":
        self._started = time.monotonic()
        self.sample()  # the starting size, before the thread's first turn
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
        self.sample()

    def sample(self) -> None:
        if self.proportional:
            if (held := tree_pss(self.pid)) is None:
                return
            total = leaves = held
        elif self.tree:
            total, leaves, members = tree_rss(self.pid)
            if not members:
                return
            for pid in members:
                if (hwm := peak_rss(pid)) is not None:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), hwm)
        elif (own := rss(self.pid)) is not None:
            total = leaves = own
        else:
            return
        try:
            progress = self.probe() if self.probe else {}
        except Exception as exc:  # noqa: BLE001 - a probe that fails must not end the sampling
            progress = {"probe_error": f"{type(exc).__name__}: {exc}"}
        self.samples.append(Sample(time.monotonic() - self._started, total, leaves, progress))


def deciles(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last tenth of `values` (at least one value each)."""
    if not values:
        raise ValueError("no samples")
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n


def drift(values: list[float]) -> float:
    """(last decile - first decile) / first decile: 0.03 is +3 % over the run."""
    first, last = deciles(values)
    return (last - first) / first


def curve(samples: list[Sample], points: int = 24) -> list[dict[str, Any]]:
    """At most `points` samples spread over the run, for the report (MiB, seconds, progress)."""
    if len(samples) <= points:
        picked = samples
    else:
        step = (len(samples) - 1) / (points - 1)
        picked = [samples[round(i * step)] for i in range(points)]
    return [
        {"t_s": round(s.t, 1), "rss_mib": round(s.rss / MIB, 1), "tree_rss_mib": round(s.tree / MIB, 1), **s.progress}
        for s in picked
    ]
