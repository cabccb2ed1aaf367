"""What a worker process keeps between chunks: engines per task set, sinks, the job registry, middleware.

Built lazily in the process that runs tasks (after the fork), so CUDA starts in the pinned child.
"""

import logging
import os
import socket
from dataclasses import dataclass, field
from itertools import combinations

from imagemill.core.accounting import Figures
from imagemill.core.credentials import with_own_credentials
from imagemill.core.jobs import JobRegistry
from imagemill.core.pipeline_key import pipeline_key
from imagemill.core.rates import RateSample, sample_now
from imagemill.core.settings import Settings, get_settings
from imagemill.core.sinks import Sink, open_sink
from imagemill.core.tasks import Task
from imagemill.pipeline.engine import Engine
from imagemill.pipeline.hooks import Middleware
from imagemill.pipeline.models import load_runners
from imagemill.pipeline.models.runner import Runner
from imagemill.pipeline.signature import pipeline_signature
from imagemill.worker.metrics import PrometheusMiddleware

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """One per worker process; `middleware` hears of model loads, batches and chunks."""

    settings: Settings
    middleware: list[Middleware] = field(default_factory=list)
    runners: dict[Task, Runner] = field(default_factory=dict)
    engines: dict[tuple[Task, ...], Engine] = field(default_factory=dict)
    sinks: dict[str, Sink] = field(default_factory=dict)
    _registry: JobRegistry | None = None

    @property
    def registry(self) -> JobRegistry:
        if self._registry is None:
            self._registry = JobRegistry(self.settings.registry_url)
        return self._registry

    def engine(self, tasks: tuple[Task, ...]) -> Engine:
        """The engine for a task set; each model is loaded once per process and shared."""
        if tasks not in self.engines:
            self.load(tasks)
            self.engines[tasks] = Engine(
                self.settings, tasks, [self.runners[task] for task in tasks], middleware=self.middleware
            )
        return self.engines[tasks]

    def load(self, tasks: tuple[Task, ...]) -> None:
        """Load the models of `tasks` not loaded yet, and publish the signatures they give."""
        missing = tuple(task for task in tasks if task not in self.runners)
        if not missing:
            return
        log.info("loading models for %s", ",".join(missing))
        loaded = load_runners(self.settings, missing, self.middleware, loaded=list(self.runners.values()))
        self.runners.update(zip(missing, loaded, strict=True))
        self.publish_signatures()

    def publish_signatures(self) -> None:
        """Every task set these models can serve, so producers can skip what is already done."""
        loaded = [task for task in Task if task in self.runners]
        for size in range(1, len(loaded) + 1):
            for tasks in combinations(loaded, size):
                signature = pipeline_signature(
                    [self.runners[task] for task in tasks], quality=self.settings.image_quality
                )
                self.registry.publish_signature(pipeline_key(tasks, self.settings), signature)

    @property
    def name(self) -> str:
        """This worker process in the job registry's per-worker figures: host:pid."""
        return f"{socket.gethostname()}:{os.getpid()}"

    def rate_sample(
        self, tasks: tuple[Task, ...], signature: str, figures: Figures, total_bytes: int
    ) -> RateSample | None:
        """One rate sample for `imagemill estimate`: the chunk's images over its wall time (None for a
        chunk that annotated nothing). The job registry keeps it as it counts the chunk."""
        if not figures.images or figures.wall_s <= 0:
            return None
        key = pipeline_key(tasks, self.settings)
        return sample_now(key, figures.images, figures.wall_s, "worker", signature, total_bytes)

    def sink(self, url: str) -> Sink:
        """The sink for a job's sink URL, opened once per process and kept for the next chunks. The
        registry holds it without a password: this worker's own IMAGEMILL_SINK gives it, or libpq finds one."""
        if url not in self.sinks:
            self.sinks[url] = open_sink(with_own_credentials(url, self.settings.sink))
        return self.sinks[url]

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        for sink in self.sinks.values():
            sink.close()
        self.engines.clear()
        self.sinks.clear()
        self.runners.clear()


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime (one per worker process)."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(get_settings(), middleware=[PrometheusMiddleware()])
    return _runtime
