"""The model runners, one per task, loaded once per process on one device and dtype.

`load_runners` is the one loading path; it tells the middleware how long each model took.
"""

import time
from collections.abc import Sequence

import torch

from imagemill.core.errors import ModelLoadError
from imagemill.core.schemas import Task
from imagemill.core.settings import Settings
from imagemill.pipeline.hooks import Middleware
from imagemill.pipeline.models.caption import CaptionRunner
from imagemill.pipeline.models.contrastive import ContrastiveRunner
from imagemill.pipeline.models.device import resolve_device, resolve_dtype
from imagemill.pipeline.models.embedding import EmbeddingRunner
from imagemill.pipeline.models.moderation import ModerationRunner
from imagemill.pipeline.models.runner import Runner
from imagemill.pipeline.models.tags import TagsRunner

RUNNERS: dict[Task, type[Runner]] = {
    Task.CAPTION: CaptionRunner,
    Task.MODERATION: ModerationRunner,
    Task.TAGS: TagsRunner,
    Task.EMBEDDING: EmbeddingRunner,
}


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
        kind = RUNNERS[task]
        towers = [r for r in (*loaded, *runners) if isinstance(r, ContrastiveRunner)]
        if issubclass(kind, ContrastiveRunner) and towers:
            runners.append(kind(settings, device, dtype, share=towers[0]))
        else:
            runners.append(kind(settings, device, dtype))
        seconds = time.perf_counter() - started
        for hook in middleware:
            hook.after_model_load(task, seconds)
    return runners
