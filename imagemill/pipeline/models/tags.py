"""Tags: zero-shot CLIP or SigLIP over a vocabulary; text embeddings computed once per process."""

import hashlib
from typing import Any

import torch

from imagemill.core.errors import ModelLoadError
from imagemill.core.schemas import Tags, TagScore, Task
from imagemill.core.settings import Settings
from imagemill.pipeline.models.contrastive import ContrastiveRunner, normalised, projected

SIGMOID_MODEL_TYPES = {"siglip", "siglip2"}
TEXT_BATCH = 256


class TagsRunner(ContrastiveRunner):
    task = Task.TAGS

    def __init__(
        self, settings: Settings, device: torch.device, dtype: torch.dtype, share: ContrastiveRunner | None = None
    ) -> None:
        super().__init__(settings, device, dtype, share)
        self.vocabulary = _vocabulary(settings)
        self.prompt = settings.tags_prompt
        self.top_k = min(settings.tags_top_k, len(self.vocabulary))
        self.threshold = settings.tags_threshold
        self.sigmoid = self.model.config.model_type in SIGMOID_MODEL_TYPES
        self.text_embeddings = self._embed_vocabulary()

    def options(self) -> dict[str, Any]:
        words = "\n".join(self.vocabulary).encode()
        return {
            "vocabulary": hashlib.sha256(words).hexdigest()[:16],
            "prompt": self.prompt,
            "top_k": self.top_k,
            "threshold": self.threshold,
        }

    @torch.inference_mode()
    def _embed_vocabulary(self) -> torch.Tensor:
        # SigLIP was trained on text padded to 64 tokens; CLIP pads to the batch
        padding = "max_length" if self.sigmoid else True
        chunks = []
        for start in range(0, len(self.vocabulary), TEXT_BATCH):
            prompts = [self.prompt.format(tag) for tag in self.vocabulary[start : start + TEXT_BATCH]]
            tokens = self.processor.tokenizer(prompts, padding=padding, truncation=True, return_tensors="pt").to(
                self.device
            )
            chunks.append(normalised(projected(self.model.get_text_features(**tokens))))
        return torch.cat(chunks)

    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor) -> list[Tags]:
        image_embeddings = normalised(self.tower.features(pixels))
        logits = image_embeddings @ self.text_embeddings.T * self.model.logit_scale.exp()
        probs = (logits + self.model.logit_bias).sigmoid() if self.sigmoid else logits.softmax(dim=-1)
        scores, indices = probs.float().topk(self.top_k, dim=-1)
        return [self._labels(s, i) for s, i in zip(scores.cpu().tolist(), indices.cpu().tolist(), strict=True)]

    def _labels(self, scores: list[float], indices: list[int]) -> Tags:
        labels = [
            TagScore(tag=self.vocabulary[i], score=round(s, 6))
            for s, i in zip(scores, indices, strict=True)
            if s >= self.threshold
        ]
        return Tags(labels=labels, model=self.model_id.name, revision=self.model_id.revision)


def _vocabulary(settings: Settings) -> list[str]:
    try:
        vocabulary = settings.vocabulary
    except OSError as exc:
        raise ModelLoadError(f"cannot read the tag vocabulary {settings.tags_vocabulary}: {exc.strerror}") from None
    if not vocabulary:
        raise ModelLoadError(f"the tag vocabulary {settings.tags_vocabulary} has no tags")
    return vocabulary
