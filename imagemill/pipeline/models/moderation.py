"""Moderation: an image classifier whose every label score is recorded; `flagged` by thresholds."""

from typing import Any

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from imagemill.core.errors import ModelLoadError
from imagemill.core.schemas import Moderation
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task
from imagemill.pipeline.models.runner import Runner


class ModerationRunner(Runner):
    task = Task.MODERATION

    processor_loader = AutoImageProcessor
    model_loader = AutoModelForImageClassification

    def __init__(self, settings: Settings, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(settings, device, dtype)
        self.labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.thresholds = settings.moderation_thresholds
        unknown = sorted(set(self.thresholds) - set(self.labels))
        if unknown:
            raise ModelLoadError(
                f"IMAGEMILL_MODERATION_THRESHOLDS names {unknown}, but {self.model_id.name!r} has labels {self.labels}"
            )
        self.multi_label = self.model.config.problem_type == "multi_label_classification"

    def options(self) -> dict[str, Any]:
        return {"thresholds": dict(sorted(self.thresholds.items()))}

    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor) -> list[Moderation]:
        logits = self.model(pixel_values=pixels).logits.float()
        probs = logits.sigmoid() if self.multi_label else logits.softmax(dim=-1)
        return [self._judge(row) for row in probs.cpu().tolist()]

    def _judge(self, row: list[float]) -> Moderation:
        scores = {label: round(score, 6) for label, score in zip(self.labels, row, strict=True)}
        flagged = any(scores[label] >= limit for label, limit in self.thresholds.items())
        return Moderation(flagged=flagged, scores=scores, model=self.model_id.name, revision=self.model_id.revision)
