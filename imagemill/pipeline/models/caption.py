"""Captioning: an image-to-text model run with batched, bounded `generate`, the path picked from its config.

BLIP (and any model that captions from pixels alone) generates unprompted; Florence-2 generates for
a task token (IMAGEMILL_CAPTION_PROMPT) and its own processor post-processes the text; a chat VLM
(SmolVLM2, SmolVLM) answers the prompt put through its processor's chat template.
"""

import logging
from importlib.util import find_spec
from typing import Any

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from imagemill.core.errors import ModelLoadError
from imagemill.core.schemas import Caption
from imagemill.core.settings import Settings, SettingsError
from imagemill.core.tasks import Task
from imagemill.pipeline.models.generation import generation_plan
from imagemill.pipeline.models.greedy import BlipGreedy, blip_greedy
from imagemill.pipeline.models.runner import Runner, load_pretrained
from imagemill.pipeline.prepare.preprocess import Preprocessor

# Florence-2's task tokens whose answer is plain text; the others (<OD>, <OCR_WITH_REGION>…) answer boxes
FLORENCE_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OCR>")
FLORENCE_MODEL_TYPES = {"florence2"}
# chat VLMs whose images are a fixed number of tokens once tiling is off (SmolVLM2 is `smolvlm`, SmolVLM `idefics3`)
CHAT_MODEL_TYPES = {"smolvlm", "idefics3"}
CHAT_PROMPT = "Describe this image in one sentence."

log = logging.getLogger(__name__)


class CaptionRunner(Runner):
    task = Task.CAPTION

    processor_loader = AutoProcessor
    model_loader = AutoModelForImageTextToText

    def __init__(self, settings: Settings, device: torch.device, dtype: torch.dtype) -> None:
        name, revision = settings.model(self.task), settings.revision(self.task)
        # the config alone says the path, so a prompt the model cannot take is refused before any weights load
        self.family = caption_family(load_pretrained(self.task, AutoConfig, name, revision))
        self.prompt = caption_prompt(settings.caption_prompt, self.family)
        try:
            super().__init__(settings, device, dtype)
        except ModelLoadError as exc:
            missing = video_dependencies_missing() if self.family == "chat" else []
            if not missing:
                raise
            # SmolVLM2's processor comes with a video half that cannot load without these: say so, not just that
            raise ModelLoadError(f"{exc}; SmolVLM2's processor also needs: pip install {' '.join(missing)}") from exc
        if self.family == "chat":
            # one tile per image: every image is the same number of tokens, so a batch needs no padding and
            # the prompt is tokenised once (the prompt's encoding reads this attribute)
            self.image_processor.do_image_splitting = False
            self.preprocess = tile_recipe(self.image_processor)
        self.max_new_tokens = settings.caption_max_new_tokens
        self.num_beams = settings.caption_num_beams
        self.plan = generation_plan(settings.caption_compile, device, self.model)
        # the static cache (compiled on a GPU) is generate's; otherwise BLIP's greedy captions skip its per-token cost
        self.greedy: BlipGreedy | None = None
        if not self.plan.static_cache:
            self.greedy, why = blip_greedy(self.model, self.num_beams, self.max_new_tokens)
            log.info("captions: %s", why)
        self._prompt_inputs = self._encode_prompt() if self.prompt is not None else {}

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        if self.prompt is not None:  # absent, not null, for BLIP: its signatures stay as they were
            options["prompt"] = self.prompt
        return options

    @torch.inference_mode()
    def infer(self, pixels: torch.Tensor) -> list[Caption]:
        # the prompt is the same for every image: tokenised once, repeated down the batch
        prompt = {key: value.expand(len(pixels), -1) for key, value in self._prompt_inputs.items()}
        if self.family == "chat":  # (batch, images per prompt = 1, channels, height, width)
            pixels = pixels.unsqueeze(1)
        if self.greedy is not None:
            return self._captions(self.greedy.generate(pixels, self.max_new_tokens))
        tokens = self.model.generate(
            pixel_values=pixels,
            **prompt,
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            **self.plan.generate_kwargs(),
        )
        if self.family == "chat":  # a decoder-only model returns the prompt too: decode only the new tokens
            tokens = tokens[:, self._prompt_inputs["input_ids"].shape[1] :]
        return self._captions(tokens)

    def _captions(self, tokens: torch.Tensor) -> list[Caption]:
        # Florence-2's post-processing wants its special tokens (it strips them itself)
        texts = [
            self._text(t) for t in self.processor.batch_decode(tokens, skip_special_tokens=self.family != "florence2")
        ]
        return [
            Caption(text=text, model=self.model_id.name, revision=self.model_id.revision, prompt=self.prompt)
            for text in texts
        ]

    @property
    def min_side(self) -> int:
        if self.family == "chat":  # a chat VLM's image is one square tile of max_image_size
            return int(dict(self.image_processor.max_image_size)["longest_edge"])
        return super().min_side

    def _encode_prompt(self) -> dict[str, torch.Tensor]:
        """The processor's own input for the prompt: task token → its question or the chat template, the
        image's tokens, the special tokens."""
        blank = Image.new("RGB", (self.min_side, self.min_side))
        if self.family == "chat":
            content = [{"type": "image"}, {"type": "text", "text": self.prompt}]
            text = self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
            encoded = self.processor(text=[text], images=[[blank]], return_tensors="pt")
        else:
            encoded = self.processor(text=[self.prompt], images=[blank], return_tensors="pt")
        return {key: encoded[key].to(self.device) for key in ("input_ids", "attention_mask") if key in encoded}

    def _text(self, decoded: str) -> str:
        if self.family != "florence2":
            return decoded.strip()
        # Florence-2's post-processing strips its special tokens and parses the answer for the task
        size = (self.min_side, self.min_side)  # used only to place boxes, which the text tasks have none of
        answer = self.processor.post_process_generation(decoded, task=self.prompt, image_size=size)[self.prompt]
        return str(answer).strip()


def tile_recipe(image_processor: Any) -> Preprocessor:
    """A chat VLM's image without tiling, straight from the decoded picture: resized to the square tile,
    rescaled, normalised. Its processor gets there by way of the longest edge at `size` (2048 px for
    SmolVLM2, an upscale of most photos) and then the tile: the same picture, at a tenth of the cost."""
    tile = int(dict(image_processor.max_image_size)["longest_edge"])
    normalise = bool(image_processor.do_normalize)
    return Preprocessor(
        size=(tile, tile),
        shortest_edge=None,
        crop=None,
        resample=int(image_processor.resample),
        scale=float(image_processor.rescale_factor) if image_processor.do_rescale else None,
        mean=tuple(image_processor.image_mean) if normalise else None,
        std=tuple(image_processor.image_std) if normalise else None,
    )


def video_dependencies_missing() -> list[str]:
    """The packages SmolVLM2's processor (images and video) needs that are not installed here."""
    return [name for name in ("torchvision", "num2words") if find_spec(name) is None]


def caption_family(config: Any) -> str:
    """`florence2`, `chat`, or `pixels` for BLIP and every model that captions from pixels alone, from the
    config's model_type (or its architectures, for a config saved under another type)."""
    model_type = getattr(config, "model_type", None)
    architectures = getattr(config, "architectures", None) or []
    if model_type in FLORENCE_MODEL_TYPES or any(a.startswith("Florence2") for a in architectures):
        return "florence2"
    if model_type in CHAT_MODEL_TYPES or any(a.startswith(("SmolVLM", "Idefics3")) for a in architectures):
        return "chat"
    return "pixels"


def caption_prompt(prompt: str | None, family: str) -> str | None:
    """The prompt the model is given; SettingsError naming IMAGEMILL_CAPTION_PROMPT for one it cannot take."""
    if family == "florence2":
        if prompt is None:
            return FLORENCE_TASKS[0]
        if prompt.strip() not in FLORENCE_TASKS:
            raise SettingsError(
                f"IMAGEMILL_CAPTION_PROMPT={prompt!r}: Florence-2 captions for one of {', '.join(FLORENCE_TASKS)}"
            )
        return prompt.strip()
    if family == "chat":
        if prompt is None:
            return CHAT_PROMPT
        if prompt.strip() in FLORENCE_TASKS:
            raise SettingsError(
                f"IMAGEMILL_CAPTION_PROMPT={prompt!r}: a Florence-2 task token; a chat model is asked in words"
            )
        return prompt
    if prompt is not None:
        raise SettingsError(
            f"IMAGEMILL_CAPTION_PROMPT={prompt!r}: this caption model (BLIP-like) takes no prompt; unset it "
            "or use a Florence-2 or chat model"
        )
    return None
