"""Captioning: an image-to-text model (BLIP by default) run with batched, bounded `generate`."""

from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from imagemill.core.schemas import Caption, Task
from imagemill.core.settings import Settings
from imagemill.pipeline.models.runner import Runner


class CaptionRunner(Runner):
    task = Task.CAPTION

    processor_loader = AutoProcessor
    model_loader = AutoModelForImageTextToText

    def __init__(self, settings: Settings, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(settings, device, dtype)
        self.max_new_tokens = settings.caption_max_new_tokens
        self.num_beams = settings.caption_num_beams

    def options(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}

    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor) -> list[Caption]:
        tokens = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        texts = self.processor.batch_decode(tokens, skip_special_tokens=True)
        return [Caption(text=text.strip(), model=self.model_id.name, revision=self.model_id.revision) for text in texts]
