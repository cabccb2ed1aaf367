"""BLIP's greedy captions without `generate`'s per-token machinery: the same tokens, a fraction of the CPU.

`generate()` costs milliseconds of Python per token (inputs prepared, cache objects, masks, outputs
recorded, stopping criteria) whatever the batch; for a small decoder that is most of a caption's
cost (and on a GPU the CPU side of each kernel launch). `BlipGreedy` runs the decoder's own weights
through the same torch operations in the same order, with the self-attention keys and values
concatenated step by step as transformers' dynamic cache does and the image's cross-attention keys
and values computed once, so every logit is bit for bit the one `generate()` computes; compiled by
TorchScript where torch has it (run as written, no graph optimisations), the whole loop is one call
that leaves the GIL to the decode threads instead of taking it back at every operation. It is used only
where that is shown: plain greedy decoding (one beam, no sampling, no setting that adds a logits
processor or a stopping rule) on a BLIP text decoder of the layout transcribed here, and only after
a probe at load has compared its logits with `generate()`'s on the loaded model and device.
"""

import logging
import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch.jit._fuser import optimized_execution  # torch.jit's own, which mypy does not see exported

from imagemill.pipeline.models.device import ONE_THREAD_MACS, one_thread

log = logging.getLogger(__name__)

# generation-config fields that cannot change greedy tokens: token ids, bookkeeping, and what the runner
# passes itself (length, beams); any other field away from its default may sample, add a logits processor
# or a stopping rule, and then `generate` runs
NEUTRAL_FIELDS = frozenset(
    {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "max_length",
        "max_new_tokens",
        "num_beams",
        "transformers_version",
        "_from_model_config",
    }
)
PROBE_BATCH, PROBE_TOKENS, PROBE_IMAGE_TOKENS = 3, 4, 5


# a decoder layer's tensors, weight then bias of each, as the loop reads them (TorchScript takes no global
# constants: the loop spells these offsets out): self-attention from 0 (query, key, value, output dense,
# output norm), cross-attention from 10 (the same), feed-forward from 20 (intermediate, output, output norm)


def _heads(x: torch.Tensor, head_size: int) -> torch.Tensor:
    """(batch, length, hidden) → (batch, heads, length, head size), as BLIP's attention views it."""
    return x.view(x.size(0), x.size(1), -1, head_size).transpose(1, 2)


def _attend(
    w: list[torch.Tensor],
    at: int,
    eps: float,
    hidden: torch.Tensor,
    keys_t: torch.Tensor,
    values: torch.Tensor,
    head_size: int,
    scale: float,
) -> torch.Tensor:
    """BLIP's attention over keys already transposed (batch, heads, head size, length); its weights from `at` in `w`."""
    query = _heads(F.linear(hidden, w[at], w[at + 1]), head_size)
    scores = torch.matmul(query, keys_t) / scale  # divided, as BLIP does (not multiplied by the inverse)
    context = torch.matmul(torch.softmax(scores, dim=-1), values)
    context = context.permute(0, 2, 1, 3).contiguous()
    context = context.view(context.size(0), context.size(1), -1)
    out = F.linear(context, w[at + 6], w[at + 7]) + hidden
    return F.layer_norm(out, [out.size(-1)], w[at + 8], w[at + 9], eps)


def _greedy_loop(
    image: torch.Tensor,
    words: torch.Tensor,
    positions: torch.Tensor,
    embedding_norm: list[torch.Tensor],
    embedding_eps: float,
    layers: list[list[torch.Tensor]],
    layer_eps: list[list[float]],
    head: list[torch.Tensor],
    head_eps: float,
    head_size: int,
    scale: float,
    bos: int,
    eos: int,
    pad: int,
    max_new_tokens: int,
    keep_logits: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """BLIP's decoder, greedily, from the image's embeddings: tokens (the start token first) and, with
    `keep_logits`, each step's float32 logits. Written for TorchScript (compiled by `greedy_loop`)."""
    batch = image.size(0)
    # the cross-attention's keys and values depend on the image alone: once per batch, as the cache keeps them,
    # laid out once as the matrix products copy them at every step (transposed keys, values, contiguous):
    # the products then read the very same contiguous operands without the copies
    cross_keys: list[torch.Tensor] = []
    cross_values: list[torch.Tensor] = []
    for w in layers:
        cross_keys.append(_heads(F.linear(image, w[12], w[13]), head_size).transpose(-1, -2).contiguous())
        cross_values.append(_heads(F.linear(image, w[14], w[15]), head_size).contiguous())
    past_keys: list[torch.Tensor] = []
    past_values: list[torch.Tensor] = []
    start = torch.full([batch, 1], bos, dtype=torch.long, device=image.device)
    tokens: list[torch.Tensor] = [start]
    logits: list[torch.Tensor] = []
    current = start
    unfinished = torch.ones([batch], dtype=torch.long, device=image.device)
    finished_some = False
    for step in range(max_new_tokens):
        hidden = F.embedding(current, words)
        hidden += positions[step : step + 1]
        hidden = F.layer_norm(hidden, [hidden.size(-1)], embedding_norm[0], embedding_norm[1], embedding_eps)
        for index in range(len(layers)):
            w, eps = layers[index], layer_eps[index]
            keys = _heads(F.linear(hidden, w[2], w[3]), head_size)
            values = _heads(F.linear(hidden, w[4], w[5]), head_size)
            if step == 0:
                past_keys.append(keys)
                past_values.append(values)
            else:  # the dynamic cache's update: concatenated along the sequence
                keys = torch.cat([past_keys[index], keys], dim=-2)
                values = torch.cat([past_values[index], values], dim=-2)
                past_keys[index], past_values[index] = keys, values
            # the masks generate adds are all zeros here (no padding; the one new token sees every
            # earlier one): adding them changes no bit, so they are left out
            hidden = _attend(w, 0, eps[0], hidden, keys.transpose(-1, -2), values, head_size, scale)
            hidden = _attend(w, 10, eps[1], hidden, cross_keys[index], cross_values[index], head_size, scale)
            inner = F.gelu(F.linear(hidden, w[20], w[21]))
            out = F.linear(inner, w[22], w[23]) + hidden
            hidden = F.layer_norm(out, [out.size(-1)], w[24], w[25], eps[2])
        transformed = F.gelu(F.linear(hidden, head[0], head[1]))
        transformed = F.layer_norm(transformed, [transformed.size(-1)], head[2], head[3], head_eps)
        scores = F.linear(transformed, head[4], head[5])
        step_logits = scores[:, -1].to(dtype=torch.float32, copy=True)
        if keep_logits:
            logits.append(step_logits)
        chosen = torch.argmax(step_logits, dim=-1)
        if finished_some:  # generate's padding of finished rows (a no-op while none has finished)
            chosen = chosen * unfinished + pad * (1 - unfinished)
        tokens.append(chosen[:, None])
        ended = chosen == eos
        if bool(ended.any()):
            unfinished = unfinished & torch.bitwise_not(ended.long())
            finished_some = True
            if not bool(unfinished.any()):
                break
        current = chosen[:, None]
    return torch.cat(tokens, dim=-1), logits


@cache
def greedy_loop() -> Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]:
    """`_greedy_loop` compiled by TorchScript, once per process; the plain function where it does not compile.

    Compiled, the loop's ~2,000 operations per batch run in torch's interpreter: no Python between them,
    and the interpreter keeps no GIL while it runs, where each eager operation gives it up and waits to
    take it back from the decode threads (on a busy CPU most of a caption's time). The same operations in
    the same order: the probe at load compares the compiled loop's logits with generate()'s."""
    try:
        with warnings.catch_warnings():
            # torch 2.x marks TorchScript deprecated and keeps it; the day it goes, the eager loop below runs
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(_greedy_loop)
    except Exception as exc:  # noqa: BLE001 - a torch without TorchScript (or a compile error) costs speed only
        log.info("captions: the greedy loop runs eagerly (TorchScript: %s)", exc)
        return _greedy_loop


def _pair(module: Any) -> list[torch.Tensor]:
    """A linear layer's or a layer norm's weight and bias (a missing bias is None: `agrees` then refuses)."""
    return [module.weight, module.bias]


def _attention(module: Any) -> list[torch.Tensor]:
    inner, out = module.self, module.output
    return [*_pair(inner.query), *_pair(inner.key), *_pair(inner.value), *_pair(out.dense), *_pair(out.LayerNorm)]


def exact_gelu(activation: Any) -> bool:
    """Whether a BLIP activation module is the exact GELU the loop computes (`F.gelu`, no tanh approximation)."""
    from transformers.activations import GELUActivation  # with the BLIP classes: only where a caption model is

    return type(activation) is GELUActivation and getattr(activation, "act", None) is F.gelu


class BlipGreedy:
    """Greedy decoding for `BlipForConditionalGeneration`, token for token what its `generate` returns."""

    def __init__(self, model: Any) -> None:
        self.model = model
        text = model.config.text_config
        decoder = model.text_decoder
        bert = decoder.bert
        first = bert.encoder.layer[0].attention.self
        self.head_size = int(first.attention_head_size)
        self.scale = math.sqrt(self.head_size)
        self.bos, self.eos, self.pad = int(text.bos_token_id), int(text.sep_token_id), int(text.pad_token_id)
        self.words = bert.embeddings.word_embeddings.weight
        self.positions = bert.embeddings.position_embeddings.weight
        self.embedding_norm = _pair(bert.embeddings.LayerNorm)
        self.embedding_eps = float(bert.embeddings.LayerNorm.eps)
        layers = bert.encoder.layer
        self.layers = [
            [
                *_attention(layer.attention),
                *_attention(layer.crossattention),
                *_pair(layer.intermediate.dense),
                *_pair(layer.output.dense),
                *_pair(layer.output.LayerNorm),
            ]
            for layer in layers
        ]
        self.layer_eps = [
            [
                float(layer.attention.output.LayerNorm.eps),
                float(layer.crossattention.output.LayerNorm.eps),
                float(layer.output.LayerNorm.eps),
            ]
            for layer in layers
        ]
        head = decoder.cls.predictions
        self.head = [*_pair(head.transform.dense), *_pair(head.transform.LayerNorm), *_pair(head.decoder)]
        self.head_eps = float(head.transform.LayerNorm.eps)
        self.activations = [
            *(layer.intermediate.intermediate_act_fn for layer in layers),
            head.transform.transform_act_fn,
        ]
        self.loop = greedy_loop()
        # the widest matrix product per image: the vision tower's feed-forward over its patches, or a
        # decoding step's feed-forward or vocabulary
        vision = model.config.vision_config
        patches = (int(vision.image_size) // int(vision.patch_size)) ** 2 + 1
        width = int(vision.hidden_size)
        hidden = int(text.hidden_size)
        self.macs_per_image = max(
            patches * width * max(width, int(vision.intermediate_size)),
            hidden * max(hidden, int(text.intermediate_size), int(text.vocab_size)),
        )

    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """What `model.generate(pixel_values=…, max_new_tokens=…, num_beams=1)` returns."""
        small = pixel_values.device.type == "cpu" and len(pixel_values) * self.macs_per_image < ONE_THREAD_MACS
        with one_thread() if small else nullcontext():
            image = self.model.vision_model(pixel_values=pixel_values)[0]  # the call BLIP's generate makes
            tokens, _ = self.decode(image, max_new_tokens, keep_logits=False)
        return tokens

    def decode(
        self, image: torch.Tensor, max_new_tokens: int, keep_logits: bool = True
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tokens (the start token first) and, with `keep_logits`, each step's float32 logits, from the
        image's embeddings."""
        # the graph as written, no optimising passes: the operations generate runs, and no others
        with optimized_execution(False):
            return self.loop(
                image,
                self.words,
                self.positions,
                self.embedding_norm,
                self.embedding_eps,
                self.layers,
                self.layer_eps,
                self.head,
                self.head_eps,
                self.head_size,
                self.scale,
                self.bos,
                self.eos,
                self.pad,
                max_new_tokens,
                keep_logits,
            )

    def agrees(self) -> bool:
        """Run both on random image embeddings for a few tokens: every logit and token must be equal."""
        tensors = [self.words, self.positions, *self.embedding_norm, *self.head, *(t for w in self.layers for t in w)]
        if not all(isinstance(t, torch.Tensor) for t in tensors):  # a layer without a bias
            return False
        if not all(exact_gelu(activation) for activation in self.activations):
            return False
        model = self.model
        parameter = next(model.parameters())
        generator = torch.Generator(device="cpu").manual_seed(0)
        width = int(model.config.text_config.encoder_hidden_size)
        image = torch.randn(PROBE_BATCH, PROBE_IMAGE_TOKENS, width, generator=generator)
        image = image.to(device=parameter.device, dtype=parameter.dtype)
        with torch.inference_mode():
            ours, our_logits = self.decode(image, PROBE_TOKENS)
            theirs = model.text_decoder.generate(
                input_ids=torch.full((PROBE_BATCH, 1), self.bos, dtype=torch.long, device=image.device),
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                encoder_hidden_states=image,
                encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long, device=image.device),
                max_new_tokens=PROBE_TOKENS,
                num_beams=1,
                output_logits=True,
                output_scores=True,
                return_dict_in_generate=True,
            )
        if not torch.equal(ours, theirs.sequences) or len(our_logits) != len(theirs.logits):
            return False
        return all(
            torch.equal(mine, raw) and torch.equal(mine, scored)
            for mine, raw, scored in zip(our_logits, theirs.logits, theirs.scores, strict=True)
        )


def moved_fields(config: Any) -> list[str]:
    """The generation config's fields, outside the neutral ones, that differ from transformers' defaults
    (a checkpoint may spell defaults out: `repetition_penalty: 1.0` changes nothing)."""
    # a function-level import: transformers' generation module is loaded only where a caption model is
    from transformers import GenerationConfig

    # transformers 5 leaves unset fields None and applies these defaults in generate; where a version
    # lacks the table, only unset fields count as neutral (the loop is then used less, never wrongly)
    table = getattr(GenerationConfig, "_get_default_generation_params", None)
    defaults: dict[str, Any] = table() if callable(table) else {}
    return sorted(
        name
        for name, value in config.to_diff_dict().items()
        if name not in NEUTRAL_FIELDS and value is not None and value != defaults.get(name)
    )


def blip_greedy(model: Any, num_beams: int, max_new_tokens: int) -> tuple[BlipGreedy | None, str]:
    """The lean decoder for `model` and why, or None and why `generate` runs instead."""
    # a function-level import: only BLIP's classes are checked, and a caption model of another family never needs them
    from transformers.models.blip import modeling_blip, modeling_blip_text

    if type(model) is not modeling_blip.BlipForConditionalGeneration:
        return None, f"{type(model).__name__} is not BLIP"
    if num_beams != 1:
        return None, f"beam search ({num_beams} beams)"
    decoder = model.text_decoder
    if type(decoder) is not modeling_blip_text.BlipTextLMHeadModel or decoder.training:
        return None, "the text decoder is not BLIP's in eval mode"
    layers = decoder.bert.encoder.layer
    # decoder layers (is_decoder) have the cross-attention the loop reads
    if not decoder.config.is_decoder or not all(type(layer) is modeling_blip_text.BlipTextLayer for layer in layers):
        return None, "a text layer without cross-attention"
    if max_new_tokens > decoder.config.max_position_embeddings:  # step i reads position i
        return None, "captions longer than the decoder's positions (generate says how it fails)"
    if decoder.config.chunk_size_feed_forward:
        return None, "a chunked feed-forward"
    extra = moved_fields(decoder.generation_config)
    if extra:
        return None, f"the generation config sets {', '.join(extra)}"
    greedy = BlipGreedy(model)
    if not greedy.agrees():
        return None, "its logits differ from generate()'s on this model and device"
    return greedy, "lean greedy loop (logits identical to generate())"
