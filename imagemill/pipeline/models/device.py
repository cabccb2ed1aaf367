"""Which device and dtype the models run on, decided once per process from settings.

Kept apart from loading so the decisions are testable without a GPU.
"""

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` picks the (pinned) GPU when there is one; otherwise the name as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name} asked for, but no CUDA GPU is visible")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float16 on a GPU (what these vision models are served in) and float32 on a CPU."""
    if name != "auto":
        return DTYPES[name]
    return torch.float16 if device.type == "cuda" else torch.float32


def pins_memory(device: torch.device) -> bool:
    """Host batches go through pinned memory (and non-blocking copies) only on the way to a GPU."""
    return device.type == "cuda"
