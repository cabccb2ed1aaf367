"""The model runners, one per task, loaded once per process on one device and dtype.

`load_runners` is the one loading path; it tells the middleware how long each model took. Which
runner a task has is the task table's (`core.tasks`): `runner_class` finds it there.
"""

import importlib
import time
from collections.abc import Sequence

import torch

from imagemill.core.errors import ModelLoadError
from imagemill.core.settings import Settings
from imagemill.core.tasks import TASKS, Task
from imagemill.pipeline.hooks import Middleware
from imagemill.pipeline.models.contrastive import ContrastiveRunner
from imagemill.pipeline.models.device import resolve_device, resolve_dtype
from imagemill.pipeline.models.runner import Runner


def runner_class(task: Task) -> type[Runner]:
    """The runner the task table names for `task` (`module:Class` in this package), imported now:
    only the runners of the tasks asked for are loaded."""
    module, _, name = TASKS[task].runner.partition(":")
    kind = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    if not (isinstance(kind, type) and issubclass(kind, Runner) and kind.task is task):
        raise TypeError(f"the task table names {TASKS[task].runner} for {task}, which is not its Runner")
    return kind


def load_runners(
    settings: Settings, tasks: tuple[Task, ...], middleware: Sequence[Middleware] = (), loaded: Sequence[Runner] = ()
) -> list[Runner]:
    """Load the model of every task asked for, in task order; ModelLoadError if one cannot load.

    Tags and embedding read one CLIP/SigLIP model: the second of them (here, or among `loaded`) shares the first's."""
    try:
        device = resolve_device(settings.device)
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"IMAGEMILL_DEVICE={settings.device!r}: {exc}") from None
    dtype = resolve_dtype(settings.dtype, device)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    runners: list[Runner] = []
    for task in tasks:
        started = time.perf_counter()
        kind = runner_class(task)
        towers = [r for r in (*loaded, *runners) if isinstance(r, ContrastiveRunner)]
        if issubclass(kind, ContrastiveRunner) and towers:
            runners.append(kind(settings, device, dtype, share=towers[0]))
        else:
            runners.append(kind(settings, device, dtype))
        seconds = time.perf_counter() - started
        for hook in middleware:
            hook.after_model_load(task, seconds)
    return runners
