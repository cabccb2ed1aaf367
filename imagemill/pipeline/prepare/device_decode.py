"""JPEG batches decoded and made into model inputs on a torch device (nvjpeg on a GPU), never via the host.

What it may decode was picked on the CPU from the header (`imagemill.pipeline.prepare.jpeg_header`); any
image it rejects goes the Pillow way (`imagemill.pipeline.prepare.decode`). The recipe is the Pillow
path's (`Preprocessor`).
"""

import importlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imagemill.pipeline.prepare.decode import _draft_box
from imagemill.pipeline.prepare.jpeg_header import PendingJpeg
from imagemill.pipeline.prepare.preprocess import Preprocessor, shortest_edge_size

log = logging.getLogger(__name__)

# Pillow's resampling filters that torch's interpolate computes the same way (antialiased when shrinking)
INTERPOLATIONS = {int(Image.Resampling.BICUBIC): "bicubic", int(Image.Resampling.BILINEAR): "bilinear"}
DISABLE_AFTER = 8  # a batch at least this big wholly refused turns the device decoder off

# JPEG bytes (uint8, 1-D, CPU) -> pictures (uint8, 3×H×W, on the device); raises on any it cannot decode
BatchDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def nvjpeg_available() -> bool:
    """Whether torchvision with its GPU JPEG decoder (nvjpeg) loads and a CUDA GPU is visible."""
    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("torchvision.io")  # loads torchvision's image operators
        return hasattr(torch.ops.image, "decode_jpegs_cuda")
    except Exception:  # noqa: BLE001 - absent, or built for another torch: no device decoding
        return False


def resolve_decode_device(setting: str, model_device: torch.device) -> torch.device | None:
    """The device JPEGs are decoded on, or None for the Pillow path (IMAGEMILL_DECODE_DEVICE).

    `auto`: the models' GPU when nvjpeg is there; `cuda`: the same, or ValueError saying why not."""
    if setting == "cpu" or (setting == "auto" and model_device.type != "cuda"):
        return None
    if model_device.type != "cuda":
        raise ValueError(f"IMAGEMILL_DECODE_DEVICE=cuda needs the models on a GPU, but they run on {model_device}")
    if not nvjpeg_available():
        if setting == "auto":
            return None
        raise ValueError("IMAGEMILL_DECODE_DEVICE=cuda, but torchvision's GPU JPEG decoder (nvjpeg) is not there")
    return model_device


def torchvision_decoder(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's `decode_jpeg` on a list (nvjpeg's batched decode on a GPU), RGB out.

    Decoded as stored (every backend has that mode); a grey picture's one channel is repeated."""
    io_ = importlib.import_module("torchvision.io")  # optional: not a dependency, and untyped
    pictures: list[torch.Tensor] = io_.decode_jpeg(datas, mode=io_.ImageReadMode.UNCHANGED, device=device)
    return [picture.expand(3, -1, -1) if picture.shape[0] == 1 else picture for picture in pictures]


def pillow_decoder(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """What torchvision's CPU `decode_jpeg` gives (full size, RGB, libjpeg), made with Pillow.

    For CPU runs of the device path where torchvision is absent (no torchvision build loads with
    the CPU torch the tests use): everything after the decode is the device path's own code."""
    pictures = []
    for data in datas:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            pixels = np.asarray(image.convert("RGB"))
        pictures.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(device))
    return pictures


def default_decoder() -> BatchDecoder:
    """torchvision's decoder when it loads, else the Pillow stand-in (CPU only)."""
    try:
        importlib.import_module("torchvision.io")
        return torchvision_decoder
    except Exception:  # noqa: BLE001 - absent, or built for another torch
        return pillow_decoder


def orient(picture: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to a 3×H×W picture, as Pillow's `exif_transpose` does."""
    if orientation == 2:
        return picture.flip(-1)
    if orientation == 3:
        return picture.flip(-2, -1)
    if orientation == 4:
        return picture.flip(-2)
    if orientation == 5:
        return picture.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(picture, -1, (-2, -1))
    if orientation == 7:
        return picture.flip(-2, -1).transpose(-2, -1)
    if orientation == 8:
        return torch.rot90(picture, 1, (-2, -1))
    return picture


def supports(recipe: Preprocessor) -> bool:
    """Whether the device path computes this recipe (its resampling filter is one torch has)."""
    return recipe.resample in INTERPOLATIONS


def reductions(width: int, height: int, min_side: int | None) -> tuple[int, int]:
    """The Pillow path's two shrink factors for a JPEG: `draft`'s DCT scale, then `reduce_to`'s box.

    The device path shrinks by the same factors (box averages) before its resize, so that both
    paths resample the same pixels; it is also the cheap way down from full size."""
    if not min_side:
        return 1, 1
    box = _draft_box(width, height, min_side)
    ratio = min(width // box[0], height // box[1])
    draft = next((scale for scale in (8, 4, 2, 1) if ratio >= scale), 1)
    reduced = min(-(-width // draft), -(-height // draft)) // min_side
    return draft, reduced if reduced >= 2 else 1


def shrink(batch: torch.Tensor, factors: tuple[int, int]) -> torch.Tensor:
    """Box-average a float N×3×H×W batch by each factor in turn (sizes rounded up, as Pillow's)."""
    for factor in factors:
        if factor > 1:
            batch = F.avg_pool2d(batch, factor, ceil_mode=True)
    return batch


def apply_recipes(
    recipes: Sequence[Preprocessor],
    pictures: Sequence[torch.Tensor],
    factors: Sequence[tuple[int, int]] | None = None,
) -> list[torch.Tensor]:
    """Oriented uint8 pictures (3×H×W, any sizes) -> each recipe's float32 batch (N×3×h×w), on their device.

    `factors`: each picture's `reductions`. Pictures of one size are converted and shrunk once, together,
    and resized together for every recipe (a photo set is mostly one size)."""
    groups: dict[tuple[int, int, tuple[int, int]], list[int]] = {}
    for index, picture in enumerate(pictures):
        key = (int(picture.shape[-2]), int(picture.shape[-1]), factors[index] if factors else (1, 1))
        groups.setdefault(key, []).append(index)
    parts: list[list[torch.Tensor]] = [[] for _ in recipes]
    order: list[int] = []
    for (_, _, reduction), indices in groups.items():
        batch = shrink(torch.stack([pictures[i] for i in indices]).float(), reduction)
        if reduction != (1, 1):
            batch = batch.round_()  # Pillow's shrunk picture is 8-bit again
        for recipe, made in zip(recipes, parts, strict=True):
            made.append(_resize_crop(recipe, batch, int(batch.shape[-2]), int(batch.shape[-1])))
        order.extend(indices)
    back = torch.as_tensor(np.argsort(order)) if order != sorted(order) else None
    return [_normalise(recipe, made, back) for recipe, made in zip(recipes, parts, strict=True)]


def _normalise(recipe: Preprocessor, parts: list[torch.Tensor], back: torch.Tensor | None) -> torch.Tensor:
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if back is not None:  # groups were made by size: rows back in the pictures' order
        out = out[back.to(out.device)]
    if recipe.scale is not None:
        out = out * recipe.scale
    if recipe.mean is not None and recipe.std is not None:
        mean = torch.tensor(recipe.mean, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
        std = torch.tensor(recipe.std, dtype=out.dtype, device=out.device).view(1, -1, 1, 1)
        out = (out - mean) / std
    return out.contiguous()


def _resize_crop(recipe: Preprocessor, batch: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if recipe.size:
        target = recipe.size
    elif recipe.shortest_edge:
        new_width, new_height = shortest_edge_size((width, height), recipe.shortest_edge)
        target = (new_height, new_width)
    else:
        target = (height, width)
    if target != (height, width):
        mode = INTERPOLATIONS[recipe.resample]
        batch = F.interpolate(batch, size=target, mode=mode, align_corners=False, antialias=True)
        # Pillow resizes 8-bit pictures: round and clamp as it does, so both paths agree
        batch = batch.round_().clamp_(0, 255)
    if recipe.crop:
        crop_height, crop_width = recipe.crop
        top, left = (batch.shape[-2] - crop_height) // 2, (batch.shape[-1] - crop_width) // 2
        batch = batch[..., top : top + crop_height, left : left + crop_width]
    return batch


@dataclass
class DeviceBatch:
    """What the device made of a batch: `decoded` indices (into the batch) and one input per recipe."""

    decoded: list[int]
    inputs: list[torch.Tensor]  # per recipe, rows in `decoded` order
    rejected: list[int]  # indices the device decoder refused: the Pillow path takes them


class DeviceDecoder:
    """Decodes batches of pending JPEGs on `device` into every recipe's input batch."""

    def __init__(
        self,
        device: torch.device,
        recipes: Sequence[Preprocessor],
        min_side: int | None = None,
        decoder: BatchDecoder | None = None,
    ) -> None:
        self.device = device
        self.recipes = list(recipes)
        self.min_side = min_side  # as the Pillow path's: the largest the models need
        self.disabled = False  # set when the decoder refused a whole batch of more than a few images
        self.decoder = decoder or (torchvision_decoder if device.type == "cuda" else default_decoder())

    def decode(self, jpegs: Sequence[PendingJpeg]) -> DeviceBatch:
        """Decode, orient, resize and normalise; images the decoder rejects are left out, by bisection."""
        if self.disabled:
            return DeviceBatch(decoded=[], inputs=[], rejected=list(range(len(jpegs))))
        datas = [torch.frombuffer(bytearray(jpeg.data), dtype=torch.uint8) for jpeg in jpegs]
        pictures: list[torch.Tensor | None] = [None] * len(jpegs)
        self._decode_into(datas, list(range(len(jpegs))), pictures)
        if len(jpegs) >= DISABLE_AFTER and all(picture is None for picture in pictures):
            # a decoder that refuses every image is broken here, not the images: stop bisecting batches
            log.warning("the device decoder refused all %d images of a batch; Pillow decodes from now on", len(jpegs))
            self.disabled = True
        decoded, oriented, factors, rejected = [], [], [], []
        for index, (jpeg, picture) in enumerate(zip(jpegs, pictures, strict=True)):
            header = jpeg.header
            if picture is None or tuple(picture.shape) != (3, header.height, header.width):
                rejected.append(index)
                continue
            decoded.append(index)
            oriented.append(orient(picture, header.orientation))
            factors.append(reductions(header.width, header.height, self.min_side))
        inputs = apply_recipes(self.recipes, oriented, factors) if oriented else []
        return DeviceBatch(decoded=decoded, inputs=inputs, rejected=rejected)

    def _decode_into(self, datas: list[torch.Tensor], indices: list[int], out: list[torch.Tensor | None]) -> None:
        try:
            pictures = self.decoder([datas[i] for i in indices], self.device)
        except Exception as exc:  # noqa: BLE001 - the decoder names no culprit: halve until it is found
            if len(indices) == 1:
                log.info("the device decoder rejected an image (%s: %s); Pillow decodes it", type(exc).__name__, exc)
                return
            middle = len(indices) // 2
            self._decode_into(datas, indices[:middle], out)
            self._decode_into(datas, indices[middle:], out)
            return
        for index, picture in zip(indices, pictures, strict=True):
            out[index] = picture
