"""What a worker process keeps between chunks: engines per task set, sinks, the job registry.

Built lazily in the process that runs tasks (after the fork), so CUDA starts in the pinned child.
"""

import logging
from dataclasses import dataclass, field

from imagemill.jobs import JobRegistry
from imagemill.schemas import Task
from imagemill.settings import Settings, get_settings
from imagemill.stores import RecordWriter, open_writer
from worker.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    engines: dict[tuple[Task, ...], Engine] = field(default_factory=dict)
    sinks: dict[str, RecordWriter] = field(default_factory=dict)
    _registry: JobRegistry | None = None

    @property
    def registry(self) -> JobRegistry:
        if self._registry is None:
            self._registry = JobRegistry(self.settings.registry_url)
        return self._registry

    def engine(self, tasks: tuple[Task, ...]) -> Engine:
        """The engine for a task set; models are loaded on first use and kept for the process."""
        if tasks not in self.engines:
            log.info("loading models for %s", ",".join(tasks))
            self.engines[tasks] = Engine(self.settings, tasks)
        return self.engines[tasks]

    def sink(self, url: str) -> RecordWriter:
        if url not in self.sinks:
            self.sinks[url] = open_writer(url)
        return self.sinks[url]

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        for sink in self.sinks.values():
            sink.close()
        self.engines.clear()
        self.sinks.clear()


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime (one per worker process)."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(get_settings())
    return _runtime
