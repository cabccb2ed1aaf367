"""Which device and dtype the models run on, decided once per process from settings.

Kept apart from loading so the decisions are testable without a GPU.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# a CPU batch whose largest matrix product (a model's `macs_per_image` times its images) is under this
# many multiply-adds runs on one thread: each operation then takes microseconds, and a second thread
# costs more than it saves (a wake-up per operation, a worker spinning after each one on a core the
# decode threads need; on a busy machine, a wait for a descheduled thread at every operation: one-image
# batches of the three tiny models called back to back on a loaded machine took 27 ms each on one
# thread and 276 ms on two; with a worker's pauses between chunks the two measured alike)
ONE_THREAD_MACS = 1 << 22

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


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch's operations on one thread inside, the count it had after (models run on one thread of ours)."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
