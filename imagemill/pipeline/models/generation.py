"""Fast generation: whether a caption model generates with a static KV cache and a compiled forward.

Decided once per model and device from IMAGEMILL_CAPTION_COMPILE, apart from the runner so the
decisions are testable on a CPU without compiling anything.
"""

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

CompileSetting = Literal["auto", "on", "off"]


class Generator(Protocol):
    """What the decision reads of a transformers model."""

    _can_compile_fullgraph: bool  # transformers' own flag: the forward compiles as one graph


@dataclass(frozen=True)
class GenerationPlan:
    """How `generate` runs: `static_cache` pre-allocates the KV cache at its full length (fixed shapes
    every step); `compiled` says whether transformers then compiles the forward (on GPUs only)."""

    static_cache: bool
    compiled: bool
    reason: str

    def generate_kwargs(self) -> dict[str, Any]:
        # transformers compiles the decoding step by itself when the cache is static and the device a GPU
        return {"cache_implementation": "static"} if self.static_cache else {}


def generation_plan(setting: CompileSetting, device: torch.device, model: Generator) -> GenerationPlan:
    """`auto`: static cache and compile on a GPU for a model transformers compiles whole; off on a CPU,
    where compiling costs minutes and gains little. `on`: the static cache wherever the model allows
    (compiled on a GPU). `off`: the dynamic cache, eager."""
    supported = bool(getattr(model, "_can_compile_fullgraph", False))
    gpu = device.type == "cuda"
    if setting == "off":
        return GenerationPlan(False, False, "IMAGEMILL_CAPTION_COMPILE=off")
    if not supported:
        return GenerationPlan(False, False, f"{type(model).__name__} does not compile as one graph in transformers")
    if setting == "auto" and not gpu:
        return GenerationPlan(False, False, "auto on a CPU: compiling costs more than it saves")
    return GenerationPlan(
        True, gpu, "static cache, compiled" if gpu else "static cache (transformers compiles on GPUs)"
    )
