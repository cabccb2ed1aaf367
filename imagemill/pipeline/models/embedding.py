"""Embedding: the tags model's image embedding, L2-normalised, one vector per image.

It reads the same CLIP/SigLIP model as the tags (IMAGEMILL_TAGS_MODEL) and, asked together with
them, the same forward pass; asked alone it loads no vocabulary.
"""

from typing import Any

import numpy as np
import torch

from imagemill.core.schemas import Embedding
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task
from imagemill.pipeline.models.contrastive import ContrastiveRunner, normalised


class EmbeddingRunner(ContrastiveRunner):
    task = Task.EMBEDDING

    def __init__(
        self, settings: Settings, device: torch.device, dtype: torch.dtype, share: ContrastiveRunner | None = None
    ) -> None:
        super().__init__(settings, device, dtype, share)
        self.storage = settings.embedding_dtype

    def options(self) -> dict[str, Any]:
        # float16 storage rounds the values every sink stores, so it is part of what a record means
        return {"normalised": "l2", "dtype": self.storage}

    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor) -> list[Embedding]:
        # normalised in float32 whatever the model's dtype: a half-precision norm is off by ~1e-3
        vectors = normalised(self.tower.features(pixels).float()).cpu().numpy()
        if self.storage == "float16":
            vectors = vectors.astype(np.float16).astype(np.float32)
        name, revision = self.model_id.name, self.model_id.revision
        return [Embedding.of(vector, model=name, revision=revision) for vector in vectors]
