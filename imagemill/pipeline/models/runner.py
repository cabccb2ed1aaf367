"""What every model runner is: one task, one loaded model, a batch of pictures in, outputs out.

Also the shared loading path, so every runner names its model and revision the same way.
"""

import functools
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image

from imagemill.core.errors import ModelLoadError
from imagemill.core.schemas import Caption, Embedding, Moderation, Tags
from imagemill.core.settings import Settings
from imagemill.core.tasks import TASKS, Task
from imagemill.pipeline.models.device import ONE_THREAD_MACS, pins_memory
from imagemill.pipeline.prepare.preprocess import from_processor

TaskOutput = Caption | Moderation | Tags | Embedding
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class ModelId:
    """A model as the record names it: hub id or directory, and the exact weights' revision."""

    name: str
    revision: str | None


class Runner(ABC):
    """A loaded model for one task; `run` is called with decoded RGB pictures."""

    task: Task

    processor_loader: Any  # the transformers Auto class of its processor
    model_loader: Any  # and of its model

    def __init__(self, settings: Settings, device: torch.device, dtype: torch.dtype) -> None:
        name, revision = settings.model(self.task), settings.revision(self.task)
        self.processor = load_pretrained(self.task, self.processor_loader, name, revision)
        # safetensors only: a checkpoint that has only pickled weights is refused, never unpickled
        model = load_pretrained(self.task, self.model_loader, name, revision, dtype=dtype, use_safetensors=True)
        self.model = model.to(device).eval()
        self.model_id = model_id(name, revision)
        self.device = device
        self.dtype = dtype
        self.image_processor = getattr(self.processor, "image_processor", self.processor)
        self.preprocess: Callable[[Image.Image], np.ndarray] = from_processor(self.image_processor) or (
            lambda image: self.image_processor(images=[image], return_tensors="np")["pixel_values"][0]
        )

    @functools.cached_property
    def macs_per_image(self) -> int:
        """Roughly the multiply-adds of this model's largest matrix product for one image: its largest
        weight once per 16x16 patch of its input (a ViT's; more than a tower not run per image does).
        A small CPU batch runs on one thread by it (`device.ONE_THREAD_MACS`)."""
        largest = max((p.numel() for p in self.model.parameters() if p.dim() >= 2), default=0)
        return largest * ((self.min_side // 16) ** 2 + 1)

    def one_thread_for(self, images: int) -> bool:
        """Whether a batch of `images` runs on one torch thread: a small batch on a CPU."""
        return self.device.type == "cpu" and images * self.macs_per_image < ONE_THREAD_MACS

    @property
    def min_side(self) -> int:
        """The shortest image side (pixels) this model's preprocessing needs, for reduced decode."""
        return processor_min_side(self.image_processor)

    @abstractmethod
    def options(self) -> dict[str, Any]:
        """Settings that change this runner's outputs; they enter the pipeline signature."""

    @abstractmethod
    def infer(self, pixels: torch.Tensor) -> Sequence[TaskOutput]:
        """One output per row of a batch made by `batch`, in order.

        A Sequence, not a list: each runner returns a list of its own output type, and a list is invariant."""

    def batch(self, inputs: Sequence[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Preprocessed images -> one tensor on the model's device and dtype.

        Tensors are rows already staged on the device (`imagemill.pipeline.prepare.staging`): stacked there."""
        if inputs and all(isinstance(row, torch.Tensor) for row in inputs):
            return torch.stack([torch.as_tensor(row) for row in inputs]).to(self.device, dtype=self.dtype)
        pixels = torch.from_numpy(np.stack([np.asarray(row) for row in inputs]))
        if pins_memory(self.device):
            # pinned host memory lets the copy overlap with the previous batch's compute
            return pixels.pin_memory().to(self.device, dtype=self.dtype, non_blocking=True)
        return pixels.to(dtype=self.dtype)

    def run(self, images: Sequence[Image.Image]) -> Sequence[TaskOutput]:
        """Preprocess and infer in one go (the engine does the two apart, on different threads)."""
        return self.infer(self.batch([self.preprocess(image) for image in images]))


def load_pretrained(task: Task, loader: Any, name: str, revision: str | None, **kwargs: Any) -> Any:
    """`loader.from_pretrained`, with any failure turned into one clear ModelLoadError."""
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # unannotated in transformers
    if looks_like_path(name) and not Path(name).expanduser().is_dir():
        # else the hub client reads it as a repo id and complains about its characters
        variable = TASKS[task].model_variable
        raise ModelLoadError(f"cannot load the {task} model {name!r}: no such directory ({variable})")
    try:
        return loader.from_pretrained(name, revision=revision, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for bad models
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if Path(name).is_dir() else "; run `imagemill models download` or point it at a local directory"
        raise ModelLoadError(f"cannot load the {task} model {name!r}: {reason}{hint}") from exc


def looks_like_path(name: str) -> bool:
    """A model named as a local directory (`/models/blip`, `./blip`, `~/m`, `a/b/c`), not a hub id (`org/name`)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def model_id(name: str, revision: str | None) -> ModelId:
    """Name the weights: a hash of a local directory's weight files, else the hub commit."""
    if Path(name).is_dir():
        return ModelId(name, weights_hash(Path(name)))
    return ModelId(name, hub_commit(name, revision))


def hub_commit(name: str, revision: str | None) -> str | None:
    """The commit a hub id resolves to in the local cache (its snapshot folder is named by it)."""
    from huggingface_hub import snapshot_download  # transformers imports it anyway; only a hub id needs it here

    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not cached as a snapshot (or any hub error): the record says the revision is unknown
        return revision


def weights_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def processor_min_side(image_processor: Any) -> int:
    """The pixels a Hugging Face image processor resizes to: its crop or its target size."""
    for attr in ("crop_size", "size"):
        size = getattr(image_processor, attr, None)
        if not size:
            continue
        if isinstance(size, int):
            return size
        size = dict(size)
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
        if "height" in size and "width" in size:
            return max(int(size["height"]), int(size["width"]))
    return 224
