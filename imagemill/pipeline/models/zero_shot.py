"""Zero-shot tagging: a vocabulary's text embeddings scored against L2-normalised image embeddings.

The one scoring the tags runner (embeddings of fresh images) and retag (stored embeddings) share,
so the same embedding gets the same labels from both; and the one way a vocabulary is embedded.
"""

import hashlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from imagemill.core.schemas import Tags, TagScore
from imagemill.pipeline.models.contrastive import normalised

# SigLIP scores each tag on its own (sigmoid, with a learned bias); CLIP shares one softmax
SIGMOID_MODEL_TYPES = frozenset({"siglip", "siglip2"})
TEXT_BATCH = 256
# scores are stored rounded: more digits than this are noise from the model's arithmetic
SCORE_DECIMALS = 6


@dataclass(frozen=True)
class TagOptions:
    """What decides the tags besides the model: they enter the pipeline signature."""

    vocabulary: tuple[str, ...]
    prompt: str
    top_k: int
    threshold: float

    def signature_options(self) -> dict[str, Any]:
        """The options as the signature holds them: the vocabulary by a hash of its words."""
        words = "\n".join(self.vocabulary).encode()
        return {
            "vocabulary": hashlib.sha256(words).hexdigest()[:16],
            "prompt": self.prompt,
            "top_k": self.top_k,
            "threshold": self.threshold,
        }


@dataclass(frozen=True)
class TopTags:
    """The labels of a batch of images as flat arrays (what both a record and a Parquet column are
    built from): image `i`'s labels are `indices[offsets[i]:offsets[i + 1]]` into the vocabulary,
    best first, with their `scores`; only the top-k at or above the threshold."""

    indices: npt.NDArray[np.int64]
    scores: npt.NDArray[np.float64]
    offsets: npt.NDArray[np.int64]


def embed_vocabulary(
    tokenizer: Any,
    text_features: Callable[[Any], torch.Tensor],
    options: TagOptions,
    sigmoid: bool,
    device: torch.device,
) -> torch.Tensor:
    """The prompt-filled vocabulary through a text tower, L2-normalised, one row per tag.

    `text_features(tokens)` is the tower's projected text embedding of a tokenizer batch."""
    # SigLIP was trained on text padded to 64 tokens; CLIP pads to the batch
    padding = "max_length" if sigmoid else True
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(options.vocabulary), TEXT_BATCH):
            prompts = [options.prompt.format(tag) for tag in options.vocabulary[start : start + TEXT_BATCH]]
            tokens = tokenizer(prompts, padding=padding, truncation=True, return_tensors="pt").to(device)
            chunks.append(normalised(text_features(tokens)))
    return torch.cat(chunks)


class ZeroShotScorer:
    """Scores L2-normalised image embeddings against a vocabulary's text embeddings: softmax over
    the vocabulary for CLIP, a sigmoid per tag (with the model's bias) for SigLIP."""

    def __init__(
        self,
        options: TagOptions,
        text_embeddings: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
    ) -> None:
        self.options = options
        self.vocabulary = options.vocabulary
        self.top_k = min(options.top_k, len(options.vocabulary))
        self.text_embeddings = text_embeddings
        # exp taken once: the scale is stored as a logarithm in both model families
        self._scale = logit_scale.exp()
        self._bias = logit_bias

    @torch.inference_mode()
    def top(self, image_embeddings: torch.Tensor) -> TopTags:
        """The top-k tags of each row of `image_embeddings` (already L2-normalised, as stored)."""
        embeddings = image_embeddings.to(self.text_embeddings.device, self.text_embeddings.dtype)
        logits = embeddings @ self.text_embeddings.T * self._scale
        probs = (logits + self._bias).sigmoid() if self._bias is not None else logits.softmax(dim=-1)
        scores, indices = probs.float().topk(self.top_k, dim=-1)
        score_array = scores.cpu().numpy().astype(np.float64).round(SCORE_DECIMALS)
        keep = score_array >= self.options.threshold
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(keep.sum(axis=1), out=offsets[1:])
        return TopTags(indices=indices.cpu().numpy()[keep].astype(np.int64), scores=score_array[keep], offsets=offsets)

    def tags(self, image_embeddings: torch.Tensor, model: str, revision: str | None) -> list[Tags]:
        """One `Tags` per row of `image_embeddings`, naming the model that made them."""
        return tags_of(self.top(image_embeddings), self.vocabulary, model, revision)


def tags_of(top: TopTags, vocabulary: Sequence[str], model: str, revision: str | None) -> list[Tags]:
    """`TopTags` as one `Tags` per image."""
    indices, scores, offsets = top.indices.tolist(), top.scores.tolist(), top.offsets.tolist()
    return [
        Tags(
            labels=[TagScore(tag=vocabulary[indices[j]], score=scores[j]) for j in range(start, stop)],
            model=model,
            revision=revision,
        )
        for start, stop in itertools.pairwise(offsets)
    ]
