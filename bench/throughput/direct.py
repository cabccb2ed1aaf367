"""The same models driven straight through transformers, without imagemill's engine.

`naive` and `model-only` use this: it loads each task's checkpoint with the Auto classes the
runners use, embeds the tag vocabulary once, and runs one batch per call exactly as a person
writing a plain loop would (processor on PIL images, then the model).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from imagemill.core.settings import Settings
from imagemill.pipeline.models.runner import processor_min_side

TASKS = ("caption", "moderation", "tags")


@dataclass
class Loaded:
    task: str
    processor: Any  # what turns PIL images into pixel_values
    model: Any
    text_embeddings: torch.Tensor | None = None  # tags only
    tokenizer: Any = None  # caption only (batch_decode)


@dataclass
class DirectModels:
    """One loaded model per task, with the output settings the runners use."""

    loaded: list[Loaded]
    max_new_tokens: int
    num_beams: int
    top_k: int
    generated_tokens: list[int] = field(default_factory=list)  # caption lengths seen (compute regime)

    @property
    def image_processors(self) -> dict[str, Any]:
        return {item.task: item.processor for item in self.loaded}

    def preprocess(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Each task's processor on the batch: pixel_values per task."""
        return {
            item.task: item.processor(images=images, return_tensors="pt")["pixel_values"].to(torch.float32)
            for item in self.loaded
        }

    @torch.inference_mode()
    def infer(self, pixels: dict[str, torch.Tensor]) -> list[Any]:
        """Every model on its batch of pixel_values; returns the per-task outputs (lists)."""
        return [getattr(self, f"_{item.task}")(item, pixels[item.task]) for item in self.loaded]

    def _caption(self, item: Loaded, pixels: torch.Tensor) -> list[str]:
        tokens = item.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        texts = item.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        self.generated_tokens.append(int(tokens.shape[-1]))
        return texts

    def _moderation(self, item: Loaded, pixels: torch.Tensor) -> list[list[float]]:
        return item.model(pixel_values=pixels).logits.float().softmax(dim=-1).tolist()

    def _tags(self, item: Loaded, pixels: torch.Tensor) -> list[list[int]]:
        embeddings = _normalised(_features(item.model.get_image_features(pixel_values=pixels)))
        logits = embeddings @ item.text_embeddings.T * item.model.logit_scale.exp()
        _, indices = logits.softmax(dim=-1).topk(self.top_k, dim=-1)
        return indices.tolist()


def min_side(models: "DirectModels | dict[str, Any]") -> int:
    """The shortest side the models' preprocessing needs (what the engine decodes JPEGs down to)."""
    processors = models.image_processors if isinstance(models, DirectModels) else models
    return max(processor_min_side(p) for p in processors.values())


def load_processors(folders: dict[str, Path], tasks: tuple[str, ...]) -> dict[str, Any]:
    """Only the image processors (cheap: no weights), per task."""
    # transformers (seconds to import) only when processors or models load: `python -m bench --help` stays quick
    from transformers import AutoImageProcessor, AutoProcessor

    processors = {}
    for task in tasks:
        if task == "moderation":
            processors[task] = AutoImageProcessor.from_pretrained(folders[task])
        else:
            processors[task] = AutoProcessor.from_pretrained(folders[task]).image_processor
    return processors


def load(folders: dict[str, Path], tasks: tuple[str, ...], settings: Settings) -> DirectModels:
    # transformers (seconds to import) only when models load, as in load_processors
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForImageTextToText,
        AutoProcessor,
    )
    from transformers.utils import logging as hf_logging  # with the model classes above

    hf_logging.disable_progress_bar()
    loaded = []
    for task in tasks:
        folder = folders[task]
        if task == "caption":
            processor = AutoProcessor.from_pretrained(folder)
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
            loaded.append(Loaded(task, processor.image_processor, model, tokenizer=processor))
        elif task == "moderation":
            processor = AutoImageProcessor.from_pretrained(folder)
            model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32).eval()
            loaded.append(Loaded(task, processor, model))
        elif task == "tags":
            processor = AutoProcessor.from_pretrained(folder)
            model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
            embeddings = _embed_vocabulary(processor.tokenizer, model, settings)
            loaded.append(Loaded(task, processor.image_processor, model, text_embeddings=embeddings))
        else:
            raise ValueError(f"unknown task {task!r}")
    top_k = min(settings.tags_top_k, len(settings.vocabulary))
    return DirectModels(loaded, settings.caption_max_new_tokens, settings.caption_num_beams, top_k)


@torch.inference_mode()
def _embed_vocabulary(tokenizer: Any, model: Any, settings: Settings) -> torch.Tensor:
    prompts = [settings.tags_prompt.format(tag) for tag in settings.vocabulary]
    chunks = []
    for start in range(0, len(prompts), 256):
        tokens = tokenizer(prompts[start : start + 256], padding=True, truncation=True, return_tensors="pt")
        chunks.append(_normalised(_features(model.get_text_features(**tokens))))
    return torch.cat(chunks)


def _features(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalised(embeddings: torch.Tensor) -> torch.Tensor:
    return embeddings / embeddings.norm(p=2, dim=-1, keepdim=True)
