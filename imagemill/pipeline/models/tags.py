"""Tags: zero-shot CLIP or SigLIP over a vocabulary; text embeddings computed once per process.

The scoring is `zero_shot`'s, the same that `imagemill retag` applies to stored embeddings.
"""

from typing import Any

import torch

from imagemill.core.errors import ModelLoadError
from imagemill.core.schemas import Tags
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task
from imagemill.pipeline.models.contrastive import ContrastiveRunner, normalised, projected
from imagemill.pipeline.models.zero_shot import SIGMOID_MODEL_TYPES, TagOptions, ZeroShotScorer, embed_vocabulary


class TagsRunner(ContrastiveRunner):
    task = Task.TAGS

    def __init__(
        self, settings: Settings, device: torch.device, dtype: torch.dtype, share: ContrastiveRunner | None = None
    ) -> None:
        super().__init__(settings, device, dtype, share)
        self.vocabulary = _vocabulary(settings)
        self.sigmoid = self.model.config.model_type in SIGMOID_MODEL_TYPES
        tag_options = TagOptions(
            tuple(self.vocabulary),
            settings.tags_prompt,
            min(settings.tags_top_k, len(self.vocabulary)),
            settings.tags_threshold,
        )
        self.text_embeddings = embed_vocabulary(
            self.processor.tokenizer,
            lambda tokens: projected(self.model.get_text_features(**tokens)),
            tag_options,
            self.sigmoid,
            self.device,
        )
        bias = self.model.logit_bias if self.sigmoid else None
        self.scorer = ZeroShotScorer(tag_options, self.text_embeddings, self.model.logit_scale, bias)

    def options(self) -> dict[str, Any]:
        return self.scorer.options.signature_options()

    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor) -> list[Tags]:
        image_embeddings = normalised(self.tower.features(pixels))
        return self.scorer.tags(image_embeddings, self.model_id.name, self.model_id.revision)


def _vocabulary(settings: Settings) -> list[str]:
    try:
        vocabulary = settings.vocabulary
    except OSError as exc:
        raise ModelLoadError(f"cannot read the tag vocabulary {settings.tags_vocabulary}: {exc.strerror}") from None
    if not vocabulary:
        raise ModelLoadError(f"the tag vocabulary {settings.tags_vocabulary} has no tags")
    return vocabulary
