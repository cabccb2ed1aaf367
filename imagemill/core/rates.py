"""The rates measured per pipeline on this pool: what `imagemill estimate` predicts from.

Workers add one sample per chunk to Redis (`imagemill:rates:<pipeline key>`, the newest 500; the job
registry keeps it in the step that counts the chunk); local runs one per run to IMAGEMILL_RATES_FILE.
A sample is images and the wall seconds one process took.
"""

import json
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

PREFIX = "imagemill:rates:"
KEPT = 500  # samples per pipeline: enough for a spread, bounded in Redis and in the file's reading


@dataclass(frozen=True)
class RateSample:
    """One process annotated `images` in `seconds` (a chunk on a worker, or a whole local run)."""

    key: str  # the pipeline key (tasks and configured models: `core.pipeline_key`)
    images: int
    seconds: float
    where: str  # worker | local
    at: float
    signature: str | None = None
    bytes_per_image: float | None = None

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "RateSample":
        return cls(**json.loads(text))


class RedisLists(Protocol):
    """The Redis commands the rates use (redis-py's client is one)."""

    def lrange(self, name: str, start: int, end: int) -> object: ...


def read_from_redis(client: RedisLists, key: str) -> list[RateSample]:
    found = client.lrange(PREFIX + key, 0, KEPT - 1)
    return [RateSample.from_json(text) for text in found] if isinstance(found, list) else []


def record_in_file(path: Path, sample: RateSample) -> None:
    """Append one line (a run's sample: small, rare; the file is read from its end)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write(sample.to_json() + "\n")


def read_from_file(path: Path, key: str) -> list[RateSample]:
    if not path.exists():
        return []
    samples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            sample = RateSample.from_json(line)
        except (ValueError, TypeError):  # a torn last line of a run that was killed mid-append
            continue
        if sample.key == key:
            samples.append(sample)
    return samples[-KEPT:]


def sample_now(
    key: str, images: int, seconds: float, where: str, signature: str | None, total_bytes: int | None
) -> RateSample:
    per_image = total_bytes / images if total_bytes and images else None
    return RateSample(key, images, seconds, where, time.time(), signature, per_image)


@dataclass(frozen=True)
class Rate:
    """Images per second per process from samples: the pooled rate and the spread it has seen."""

    samples: int
    images: int
    per_s: float  # all images over all seconds
    low: float  # the 10th percentile of the samples' rates (the slowest when fewer than 10)
    high: float  # the 90th percentile (the fastest when fewer than 10)


def pooled(samples: Sequence[RateSample]) -> Rate | None:
    """The rate of `samples` with its spread; None without any sample that did work."""
    useful = [s for s in samples if s.images > 0 and s.seconds > 0]
    if not useful:
        return None
    rates = sorted(s.rate for s in useful)
    if len(rates) >= 10:
        deciles = statistics.quantiles(rates, n=10)
        low, high = deciles[0], deciles[-1]
    else:
        low, high = rates[0], rates[-1]
    images = sum(s.images for s in useful)
    return Rate(len(useful), images, images / sum(s.seconds for s in useful), low, high)


def gathered(*groups: Iterable[RateSample]) -> list[RateSample]:
    return [sample for group in groups for sample in group]


@dataclass(frozen=True)
class Prediction:
    """How long `images` take on `workers` processes at a measured rate, with its spread, and the cost."""

    images: int
    workers: int
    rate: Rate
    seconds: float  # at the pooled rate
    fastest_s: float  # at the rate's high end
    slowest_s: float  # at its low end
    cost: float | None  # process seconds at IMAGEMILL_COST_PER_HOUR (the same on any number of workers)
    cost_low: float | None
    cost_high: float | None


def predict(images: int, rate: Rate, workers: int, cost_per_hour: float | None) -> Prediction:
    """Time is images over (rate × workers); cost is the process seconds, whatever the workers."""
    process_s = images / rate.per_s
    fastest, slowest = images / max(rate.high, rate.per_s), images / min(rate.low, rate.per_s)

    def priced(seconds: float) -> float | None:
        return None if cost_per_hour is None else seconds * cost_per_hour / 3600

    return Prediction(
        images,
        workers,
        rate,
        process_s / workers,
        fastest / workers,
        slowest / workers,
        priced(process_s),
        priced(fastest),
        priced(slowest),
    )
