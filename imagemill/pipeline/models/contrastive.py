"""The image tower of a CLIP or SigLIP model, shared by the tasks that read it (tags, embedding).

One loaded model and one vision forward per batch serve both tasks: the second asker of a batch
gets the features the first one computed.
"""

from typing import Any

import torch
from transformers import AutoModel, AutoProcessor

from imagemill.core.settings import Settings
from imagemill.pipeline.models.runner import Runner


class ImageTower:
    """`features(pixels)`: the model's projected image embeddings (not normalised), computed once
    per batch tensor. The engine hands every runner of one input recipe the same tensor, so
    holding the last one (a strong reference: its id cannot be reused meanwhile) is the cache."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._pixels: torch.Tensor | None = None
        self._features: torch.Tensor | None = None

    @torch.inference_mode()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._features is None or pixels is not self._pixels:
            self._features = None  # a failed forward must not leave the previous batch's answer
            self._pixels = pixels
            self._features = projected(self.model.get_image_features(pixel_values=pixels))
        return self._features


class ContrastiveRunner(Runner):
    """A runner over a CLIP/SigLIP model. Given `share`, it loads nothing and reads the same model
    (and image tower) as that runner: tags and embedding asked together cost one model, one forward."""

    processor_loader = AutoProcessor
    model_loader = AutoModel

    def __init__(
        self, settings: Settings, device: torch.device, dtype: torch.dtype, share: "ContrastiveRunner | None" = None
    ) -> None:
        if share is None:
            super().__init__(settings, device, dtype)
            self.tower = ImageTower(self.model)
            return
        self.processor, self.model, self.model_id = share.processor, share.model, share.model_id
        self.device, self.dtype = share.device, share.dtype
        # the same preprocess object: the engine then prepares one array per image for both
        self.image_processor, self.preprocess, self.tower = share.image_processor, share.preprocess, share.tower


def projected(output: Any) -> torch.Tensor:
    """The projected embedding of a `get_*_features` call."""
    # transformers 5 returns an output object whose pooler_output is the projected embedding
    if isinstance(output, torch.Tensor):
        return output
    pooled: torch.Tensor = output.pooler_output
    return pooled


def normalised(embeddings: torch.Tensor) -> torch.Tensor:
    # torch.div, not `/`: the same operation, but typed (Tensor.__truediv__ returns Any in torch's stubs)
    return torch.div(embeddings, embeddings.norm(p=2, dim=-1, keepdim=True))
