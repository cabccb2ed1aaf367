"""Per-image accounting: seconds in each stage, the models' busy share, their wait for input, and
what the figures say (the stage that bounds a run, its cost).

One `Accounting` per engine is filled where the work happens: the prefetch threads add `read`,
`decode` and `preprocess`, the engine each model's seconds and its wait for input (starvation), the
run loop the writes and the wall time. Readers take `Figures` snapshots and subtract them (a chunk's
share of a long-lived engine); `Figures.fields()` is the flat form the job registry and the rates keep.
"""

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

# the stages that run per image beside the models (thread seconds, overlapping the models) and the write
INPUT_STAGES = ("read", "decode", "preprocess")
RECORDS_STAGE = "records"  # the run thread's own work around the models: batches in, records built and handed on
MODEL_PREFIX = "model:"  # a model's stage is model:<task>


@dataclass(frozen=True)
class Figures:
    """What an engine did over some span. Stage seconds are summed over images (`read`, `decode` and
    `preprocess` on the prefetch threads, overlapping the models; `write` and `model:<task>` on the
    run's own thread). On the run's thread `starved_s + model_s + write` is (nearly) the wall time:
    what is left is building records and the loop itself."""

    images: int = 0
    wall_s: float = 0.0  # the run loop's wall time
    cpu_s: float = 0.0  # the process's CPU seconds over that wall time (every thread)
    model_s: float = 0.0  # wall seconds inside the models (every task of every batch)
    model_cpu_s: float = 0.0  # the process's CPU seconds while inside the models
    starved_s: float = 0.0  # wall seconds the models waited for their next batch of input
    stages: Mapping[str, float] = field(default_factory=dict)
    accelerator: str = "cpu"  # the models' device type: cpu or cuda

    def __sub__(self, other: "Figures") -> "Figures":
        return self._combine(other, -1)

    def __add__(self, other: "Figures") -> "Figures":
        return self._combine(other, 1)

    def _combine(self, other: "Figures", sign: int) -> "Figures":
        names = dict.fromkeys([*self.stages, *other.stages])
        return Figures(
            images=self.images + sign * other.images,
            wall_s=self.wall_s + sign * other.wall_s,
            cpu_s=self.cpu_s + sign * other.cpu_s,
            model_s=self.model_s + sign * other.model_s,
            model_cpu_s=self.model_cpu_s + sign * other.model_cpu_s,
            starved_s=self.starved_s + sign * other.starved_s,
            stages={n: self.stages.get(n, 0.0) + sign * other.stages.get(n, 0.0) for n in names},
            accelerator=self.accelerator if self.accelerator != "cpu" else other.accelerator,
        )

    def stage(self, name: str) -> float:
        return self.stages.get(name, 0.0)

    def per_image(self) -> dict[str, float]:
        """Seconds per image in each stage (read, decode, preprocess, each model, records, write)."""
        if not self.images:
            return {}
        order = [*INPUT_STAGES, *sorted(n for n in self.stages if n.startswith(MODEL_PREFIX)), RECORDS_STAGE, "write"]
        return {name: self.stage(name) / self.images for name in order if name in self.stages}

    @property
    def busy_ratio(self) -> float | None:
        """The accelerator's busy share: on a GPU the time it computes over the wall time; on the CPU
        the models' share of the process's CPU time. None before anything ran."""
        if self.accelerator == "cpu":
            return min(self.model_cpu_s / self.cpu_s, 1.0) if self.cpu_s > 0 else None
        return min(self.model_s / self.wall_s, 1.0) if self.wall_s > 0 else None

    @property
    def starved_ratio(self) -> float | None:
        """The share of the wall time the models sat idle waiting for input."""
        return min(self.starved_s / self.wall_s, 1.0) if self.wall_s > 0 else None

    @property
    def accounted_s(self) -> float:
        """The run thread's measured parts: waiting for input, the models, building records, the writes."""
        return self.starved_s + self.model_s + self.stage(RECORDS_STAGE) + self.stage("write")

    def fields(self) -> dict[str, float]:
        """The flat form kept in Redis and in the rates (`from_fields` reads it back)."""
        flat = {
            "images": float(self.images),
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "model_s": self.model_s,
            "model_cpu_s": self.model_cpu_s,
            "starved_s": self.starved_s,
            "gpu": 0.0 if self.accelerator == "cpu" else 1.0,
        }
        return flat | {f"stage:{name}": seconds for name, seconds in self.stages.items()}

    @classmethod
    def from_fields(cls, flat: Mapping[str, float]) -> "Figures":
        return cls(
            images=int(flat.get("images", 0)),
            wall_s=flat.get("wall_s", 0.0),
            cpu_s=flat.get("cpu_s", 0.0),
            model_s=flat.get("model_s", 0.0),
            model_cpu_s=flat.get("model_cpu_s", 0.0),
            starved_s=flat.get("starved_s", 0.0),
            stages={k.removeprefix("stage:"): v for k, v in flat.items() if k.startswith("stage:")},
            accelerator="cuda" if flat.get("gpu", 0.0) > 0 else "cpu",
        )

    def to_document(self) -> dict[str, object]:
        """For `--json` and the bench reports: seconds per image, shares and the bounding stage."""
        return {
            "images": self.images,
            "wall_s": round(self.wall_s, 4),
            "seconds_per_image": {k: round(v, 6) for k, v in self.per_image().items()},
            "stage_seconds": {k: round(v, 4) for k, v in self.stages.items()},
            "model_s": round(self.model_s, 4),
            "starvation_s": round(self.starved_s, 4),
            "accelerator": self.accelerator,
            "accelerator_busy_ratio": _rounded(self.busy_ratio),
            "starved_ratio": _rounded(self.starved_ratio),
            "bound": bound(self),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def bound(figures: Figures) -> str | None:
    """Which stage limits the run and by how much, from the measured figures; None before any ran.

    The run's thread either waits for input (the models idle), runs the models, or writes: the largest
    share bounds it. Waiting for input is named for the input stage with the most thread seconds."""
    wall = figures.wall_s
    if wall <= 0 or not figures.images:
        return None
    idle, busy, write = figures.starved_s / wall, figures.model_s / wall, figures.stage("write") / wall
    if idle >= busy and idle >= write:
        stage = max(INPUT_STAGES, key=figures.stage)
        if stage == "read":
            advice = "more IMAGEMILL_FETCH_THREADS or storage nearer the workers would help"
        elif figures.accelerator == "cpu":
            advice = "more CPU cores or IMAGEMILL_DECODE_THREADS per worker would help"
        else:
            advice = "more CPU workers per GPU or IMAGEMILL_DECODE_DEVICE=cuda would help"
        return f"{stage}-bound: models idle {idle:.0%}; {advice}"
    if busy >= write:
        models = {n.removeprefix(MODEL_PREFIX): figures.stage(n) for n in figures.stages if n.startswith(MODEL_PREFIX)}
        slowest = max(models, key=lambda task: models[task], default="")
        share = f" ({slowest} {models[slowest] / figures.model_s:.0%} of it)" if slowest and figures.model_s else ""
        return (
            f"model-bound: models busy {busy:.0%}{share}, idle for input {idle:.0%}; "
            "a faster accelerator, a larger IMAGEMILL_BATCH_SIZE or fewer tasks would help"
        )
    return f"write-bound: writing takes {write:.0%}; a larger IMAGEMILL_CHUNK_SIZE or a faster sink would help"


def cost(seconds: float, cost_per_hour: float | None, processes: int = 1) -> float | None:
    """What `processes` processes cost over `seconds` at `cost_per_hour` each; None without a price."""
    if cost_per_hour is None:
        return None
    return seconds * processes * cost_per_hour / 3600


class Accounting:
    """The live recorder of one engine: thread-safe adds, `figures()` snapshots.

    `enabled=False` (IMAGEMILL_ACCOUNTING=0, only to measure what recording costs) records nothing;
    callers skip their timers too."""

    def __init__(self, accelerator: str = "cpu", enabled: bool = True) -> None:
        self.enabled = enabled
        self.accelerator = accelerator
        self._lock = threading.Lock()
        self._stages: dict[str, float] = {}
        self._images = 0
        self._wall = self._cpu = self._model = self._model_cpu = self._starved = 0.0
        self._seen = (0.0, 0.0)  # the models' and the writes' totals at the last `mark_loop` or `handed_on`

    def add(self, stage: str, seconds: float) -> None:
        """`seconds` more in `stage` (called from any thread)."""
        with self._lock:
            self._stages[stage] = self._stages.get(stage, 0.0) + seconds

    def starved(self, seconds: float) -> None:
        """The models waited `seconds` for their next batch."""
        with self._lock:
            self._starved += seconds

    def models(self, seconds: float, cpu_seconds: float) -> None:
        """A batch spent `seconds` (and the process `cpu_seconds`) in every model."""
        with self._lock:
            self._model += seconds
            self._model_cpu += cpu_seconds

    def mark_loop(self) -> None:
        """An engine's run loop starts: the models and writes counted so far are not its `handed_on`'s."""
        with self._lock:
            self._seen = (self._model, self._stages.get("write", 0.0))

    def handed_on(self, seconds: float) -> None:
        """A batch took `seconds` of the run thread from its arrival to the wait for the next: less the
        models and the writes counted since (not counted twice), the run thread's own work (`records`)."""
        with self._lock:
            models, writes = self._model, self._stages.get("write", 0.0)
            records = seconds - (models - self._seen[0]) - (writes - self._seen[1])
            self._seen = (models, writes)
            self._stages[RECORDS_STAGE] = self._stages.get(RECORDS_STAGE, 0.0) + max(records, 0.0)

    def written(self, images: int, seconds: float) -> None:
        """`images` records were written in `seconds` (the `write` stage; images count once written)."""
        with self._lock:
            self._images += images
            self._stages["write"] = self._stages.get("write", 0.0) + seconds

    @contextmanager
    def span(self) -> Iterator[None]:
        """Count the wall and process CPU time of the block (the run loop) as the run's."""
        if not self.enabled:
            yield
            return
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            with self._lock:
                self._wall += time.perf_counter() - wall
                self._cpu += time.process_time() - cpu

    def figures(self) -> Figures:
        with self._lock:
            return Figures(
                images=self._images,
                wall_s=self._wall,
                cpu_s=self._cpu,
                model_s=self._model,
                model_cpu_s=self._model_cpu,
                starved_s=self._starved,
                stages=dict(self._stages),
                accelerator=self.accelerator,
            )
