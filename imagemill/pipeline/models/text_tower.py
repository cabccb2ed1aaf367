"""The text tower of a CLIP or SigLIP checkpoint, loaded alone: what retag embeds a vocabulary with.

From a full checkpoint only the text model's weights are read (transformers leaves the vision
tower's tensors in the file), projected into the size the full model uses; the logit scale (and
SigLIP's bias), which live on the full model, are read from the checkpoint's safetensors by name.
"""

import copy
import json
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from imagemill.core.errors import ModelLoadError
from imagemill.core.tasks import Task
from imagemill.pipeline.models.runner import load_pretrained
from imagemill.pipeline.models.zero_shot import (
    SIGMOID_MODEL_TYPES,
    TagOptions,
    ZeroShotScorer,
    embed_vocabulary,
)

# model_type -> the transformers class of its text tower alone (with the projection into the shared space)
TEXT_TOWERS = {
    "clip": "CLIPTextModelWithProjection",
    "siglip": "SiglipTextModel",
    "siglip2": "Siglip2TextModel",
}
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


class TextTower:
    """A CLIP/SigLIP text model, its tokenizer and the full model's logit scale (and bias)."""

    def __init__(self, name: str, revision: str | None, device: torch.device) -> None:
        config = load_pretrained(Task.TAGS, AutoConfig, name, revision)
        model_type = str(getattr(config, "model_type", ""))
        if model_type not in TEXT_TOWERS:
            known = ", ".join(sorted(TEXT_TOWERS))
            raise ModelLoadError(f"the tags model {name!r} is a {model_type!r} model; retag knows {known}")
        loader = getattr(transformers, TEXT_TOWERS[model_type])
        kwargs = {"dtype": torch.float32, "use_safetensors": True, "config": _text_config(config)}
        with _quiet():  # the load report lists every vision weight left in the file: expected, not news
            model = load_pretrained(Task.TAGS, loader, name, revision, **kwargs)
        self.model = model.to(device).eval()
        self.tokenizer = load_pretrained(Task.TAGS, AutoTokenizer, name, revision)
        self.device = device
        self.sigmoid = model_type in SIGMOID_MODEL_TYPES
        logits = _logit_parameters(name, revision)
        self.logit_scale = logits["logit_scale"].to(device, torch.float32)
        bias = logits.get("logit_bias")
        self.logit_bias = bias.to(device, torch.float32) if self.sigmoid and bias is not None else None
        if self.sigmoid and self.logit_bias is None:
            raise ModelLoadError(f"the tags model {name!r} is SigLIP but its weights hold no logit_bias")

    def features(self, tokens: Any) -> torch.Tensor:
        """The projected text embedding of a tokenizer batch (not normalised)."""
        output = self.model(**tokens)
        # CLIPTextModelWithProjection: text_embeds; SigLIP's text model: its head's pooler_output
        embeds: torch.Tensor = output.text_embeds if hasattr(output, "text_embeds") else output.pooler_output
        return embeds

    def scorer(self, options: TagOptions) -> ZeroShotScorer:
        """The vocabulary embedded once, ready to score image embeddings."""
        text = embed_vocabulary(self.tokenizer, self.features, options, self.sigmoid, self.device)
        return ZeroShotScorer(options, text, self.logit_scale, self.logit_bias)


def _text_config(config: Any) -> Any:
    """The text tower's config as the full model builds it. CLIPModel projects text into its own
    `projection_dim`; the text tower alone reads `text_config.projection_dim`, which converted
    checkpoints (LAION's) leave at CLIPTextConfig's default 512, so the full model's wins here.
    SigLIP's text tower sizes its head from `text_config` in both, so it is taken as it is."""
    text_config = copy.deepcopy(config.text_config)
    projection_dim = getattr(config, "projection_dim", None)
    if projection_dim is not None and hasattr(text_config, "projection_dim"):
        text_config.projection_dim = projection_dim
    return text_config


def _logit_parameters(name: str, revision: str | None) -> dict[str, torch.Tensor]:
    """`logit_scale` (and `logit_bias`) read by name from the checkpoint's safetensors."""
    # only retag reads two tensors by name: the rest of the module does without these
    from safetensors import safe_open
    from transformers.utils.hub import cached_file

    try:
        index = cached_file(name, WEIGHTS_INDEX, revision=revision, _raise_exceptions_for_missing_entries=False)
        if index:  # a sharded checkpoint: the index says which shard holds the scale
            with open(index, encoding="utf-8") as handle:
                shard = json.load(handle)["weight_map"]["logit_scale"]
            path = cached_file(name, shard, revision=revision)
        else:
            path = cached_file(name, WEIGHTS, revision=revision)
        if path is None:
            raise OSError(f"no {WEIGHTS}")
        with safe_open(path, framework="pt") as weights:
            keys = set(weights.keys())
            found = {key: weights.get_tensor(key) for key in ("logit_scale", "logit_bias") if key in keys}
        if "logit_scale" not in found:
            raise KeyError("the weights hold no logit_scale")
        return found
    except (OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the logit scale of the tags model {name!r}: {exc}") from None


class _quiet:
    """transformers' logging at error level for the duration of a `with`."""

    def __enter__(self) -> None:
        self._level = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]

    def __exit__(self, *exc: object) -> None:
        transformers.utils.logging.set_verbosity(self._level)
