"""GPU slots: which GPUs the machine has (nvidia-smi, never torch) and one process per GPU or the CPU,
with the environment each process starts with (`CUDA_VISIBLE_DEVICES`, its device, its metrics port).

Shared by the worker's supervisor and local mode's engine processes: `--gpus` means the same to both.
"""

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

CPU = "cpu"
METRICS_PORT_VAR = "IMAGEMILL_METRICS_PORT"


@dataclass(frozen=True)
class Slot:
    """One worker process to run: a GPU index, or the CPU; `index` is its place among the slots."""

    gpu: str | None
    index: int = 0

    @property
    def name(self) -> str:
        return f"gpu{self.gpu}" if self.gpu is not None else f"cpu{os.getpid()}"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        # SIGTERM is Celery's warm shutdown, which `imagemill.worker.shutdown` bounds: the running chunk
        # gets IMAGEMILL_SOFT_SHUTDOWN_TIMEOUT seconds to finish, then goes back to the queue; an idle
        # worker exits at once (REMAP_SIGTERM=SIGQUIT would sleep the whole timeout after any chunk)
        if self.gpu is None:
            env["CUDA_VISIBLE_DEVICES"] = ""
            env.setdefault("IMAGEMILL_DEVICE", "cpu")
        else:
            # the child sees exactly one GPU, as cuda:0
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
            env["IMAGEMILL_DEVICE"] = "cuda:0"
        # one metrics endpoint per worker process: IMAGEMILL_METRICS_PORT + its index
        base_port = env.get(METRICS_PORT_VAR, "").strip()
        if base_port.isdigit():
            env[METRICS_PORT_VAR] = str(int(base_port) + self.index)
        return env


def detect_gpus() -> list[str]:
    """GPU indices from nvidia-smi (not torch: CUDA must stay uninitialised here)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def plan_slots(gpus: str, detect: Callable[[], list[str]] = detect_gpus) -> list[Slot]:
    """`all`, `0,2` or `cpu` -> the worker processes to run. ValueError when none can run."""
    spec = gpus.strip().lower()
    if spec == CPU:
        return [Slot(None)]
    if spec == "all":
        found = detect()
        if not found:
            raise ValueError("--gpus all: no NVIDIA GPU found (nvidia-smi); use --gpus cpu to run on the CPU")
        return [Slot(gpu, i) for i, gpu in enumerate(found)]
    indices = [part.strip() for part in spec.split(",") if part.strip()]
    if not indices or not all(index.isdigit() for index in indices):
        raise ValueError(f"--gpus {gpus}: expected all, cpu, or GPU indices such as 0,2")
    if len(set(indices)) != len(indices):
        raise ValueError(f"--gpus {gpus}: a GPU is listed twice")
    return [Slot(gpu, i) for i, gpu in enumerate(indices)]
