"""Per-image model input, computed on the decode threads instead of in the model's way.

Mirrors a Hugging Face image processor's resize ▸ crop ▸ rescale ▸ normalise with Pillow and
numpy (outputs equal to the processor's within a tolerance, tested); unknown ones fall back to it.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Preprocessor:
    """One model's input recipe. Equal recipes are computed once per image and shared."""

    size: tuple[int, int] | None  # (height, width) to resize to exactly, or None
    shortest_edge: int | None  # resize keeping the aspect ratio so the shorter side is this
    crop: tuple[int, int] | None  # (height, width) centre crop after resizing
    resample: int
    scale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def __call__(self, image: Image.Image) -> np.ndarray:
        """RGB picture -> float32 array (3, H, W), ready to stack into a batch."""
        image = self._resize(image)
        if self.crop:
            image = centre_crop(image, *self.crop)
        if image.mode != "RGB":  # not what decoding hands over: the arithmetic itself, on whatever it is
            return np.ascontiguousarray(self._normalised(np.asarray(image, dtype=np.float32)).transpose(2, 0, 1))
        # a byte has 256 values: each channel's is looked up in the table of their results, which holds
        # the very floats the arithmetic gives (at half its cost, and in the (3, H, W) layout at once)
        channels = np.asarray(image).transpose(2, 0, 1)
        pixels = np.empty(channels.shape, dtype=np.float32)
        for channel, table in enumerate(self._table):
            np.take(table, channels[channel], out=pixels[channel])
        return pixels

    @cached_property
    def _table(self) -> np.ndarray:
        """(3, 256): every byte value of each channel, rescaled and normalised as `_normalised` does it."""
        values = np.repeat(np.arange(256, dtype=np.float32)[:, None], 3, axis=1)
        return np.ascontiguousarray(self._normalised(values).T)

    def _normalised(self, pixels: np.ndarray) -> np.ndarray:
        """Float32 (…, 3) → rescaled and normalised in place, operation by operation in float32."""
        if self.scale is not None:
            pixels *= self.scale
        if self.mean is not None and self.std is not None:
            pixels -= np.asarray(self.mean, dtype=np.float32)
            pixels /= np.asarray(self.std, dtype=np.float32)
        return pixels

    def _resize(self, image: Image.Image) -> Image.Image:
        if self.size:
            height, width = self.size
            return image.resize((width, height), resample=self.resample)
        if self.shortest_edge:
            return image.resize(shortest_edge_size(image.size, self.shortest_edge), resample=self.resample)
        return image


def shortest_edge_size(size: tuple[int, int], edge: int) -> tuple[int, int]:
    """(width, height) with the shorter side `edge`, as transformers computes it."""
    width, height = size
    if width <= height:
        return edge, int(edge * height / width)
    return int(edge * width / height), edge


def centre_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    left = (image.width - width) // 2
    top = (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def from_processor(processor: Any) -> Preprocessor | None:
    """The recipe of a Hugging Face image processor, or None when it does something else."""
    size = dict(getattr(processor, "size", None) or {})
    if not getattr(processor, "do_resize", True) or set(size) - {"height", "width", "shortest_edge"}:
        return None
    crop = dict(getattr(processor, "crop_size", None) or {}) if getattr(processor, "do_center_crop", False) else {}
    normalise = getattr(processor, "do_normalize", False)
    return Preprocessor(
        size=(size["height"], size["width"]) if "height" in size else None,
        shortest_edge=size.get("shortest_edge"),
        crop=(crop["height"], crop["width"]) if crop else None,
        resample=int(getattr(processor, "resample", Image.Resampling.BICUBIC)),
        scale=float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else None,
        mean=tuple(processor.image_mean) if normalise else None,
        std=tuple(processor.image_std) if normalise else None,
    )
