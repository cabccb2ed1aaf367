"""The two model sets the benchmark runs, as local checkpoint folders imagemill loads by path.

* tiny: the test suite's tiny checkpoints (hidden size 32, two layers): the models cost almost
  nothing, so the numbers measure the pipeline around them (fetch, decode, batching, records).
* real: the real architectures at their real sizes, with random weights built from configs:
  BLIP-base captioning (ViT-B/16 at 384 px, BERT-base text decoder), a ViT-B/16 224 px image
  classifier with the labels normal/nsfw, and CLIP ViT-B/32. The compute is real, the outputs are
  not. Their tokenizers are the tiny ones (so the text vocabularies are small; nothing else is).

Both are built once into the cache folder (`bench/.cache/models/`) and reused.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fixtures.tiny_models import MODERATION_LABELS, build_tiny_models, quiet_transformers

MARKER = "built.json"
REAL_VERSION = 1  # bump when the real-size builders change, to rebuild cached folders
MODEL_SETS = ("tiny", "real")


@dataclass(frozen=True)
class ModelSet:
    name: str  # tiny | real
    caption: Path
    moderation: Path
    tags: Path
    build_s: float  # 0 when the cache already held them
    description: str

    def folder(self, task: str) -> Path:
        return {"caption": self.caption, "moderation": self.moderation, "tags": self.tags}[task]

    def env(self) -> dict[str, str]:
        """IMAGEMILL_* variables that point imagemill at these models."""
        return {
            "IMAGEMILL_CAPTION_MODEL": str(self.caption),
            "IMAGEMILL_MODERATION_MODEL": str(self.moderation),
            "IMAGEMILL_TAGS_MODEL": str(self.tags),
        }


DESCRIPTIONS = {
    "tiny": "tiny checkpoints from tests/fixtures/tiny_models.py (hidden 32, 2 layers, 64 px): "
    "pipeline-overhead regime",
    "real": "real sizes, random weights: BLIP-base (ViT-B/16 384 px + BERT-base decoder), ViT-B/16 224 px classifier, "
    "CLIP ViT-B/32: compute regime",
}


def model_set(name: str, cache: Path, rebuild: bool = False) -> ModelSet:
    if name == "tiny":
        return tiny_set(cache, rebuild)
    if name == "real":
        return real_set(cache, rebuild)
    raise ValueError(f"unknown model set {name!r} (expected one of {', '.join(MODEL_SETS)})")


def tiny_set(cache: Path, rebuild: bool = False) -> ModelSet:
    root = cache / "models" / "tiny"
    started = time.perf_counter()
    built = False
    if rebuild or not (root / MARKER).is_file():
        dirs = build_tiny_models(root)
        (root / MARKER).write_text(json.dumps({k: str(v) for k, v in dirs.items()}))
        built = True
    dirs = {k: Path(v) for k, v in json.loads((root / MARKER).read_text()).items()}
    elapsed = time.perf_counter() - started if built else 0.0
    return ModelSet("tiny", dirs["caption"], dirs["moderation"], dirs["tags"], elapsed, DESCRIPTIONS["tiny"])


def real_set(cache: Path, rebuild: bool = False) -> ModelSet:
    tiny = tiny_set(cache)  # its tokenizers are reused
    root = cache / "models" / "real"
    marker = root / MARKER
    started = time.perf_counter()
    built = False
    current = marker.is_file() and json.loads(marker.read_text()).get("version") == REAL_VERSION
    if rebuild or not current:
        with quiet_transformers():
            build_blip_base(root / "blip-base-caption", tiny.caption)
            build_vit_base_moderation(root / "vit-base-moderation")
            build_clip_b32_tags(root / "clip-b32-tags", tiny.tags)
        marker.write_text(json.dumps({"version": REAL_VERSION}))
        built = True
    elapsed = time.perf_counter() - started if built else 0.0
    return ModelSet(
        "real",
        root / "blip-base-caption",
        root / "vit-base-moderation",
        root / "clip-b32-tags",
        elapsed,
        DESCRIPTIONS["real"],
    )


# Salesforce/blip-image-captioning-large's vision tower: ViT-L/16 at 384 px
BLIP_LARGE_VISION = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 16,
    "initializer_range": 0.02,
}


def save_blip(
    out: Path,
    tokenizer: Any,
    vision_config: dict[str, Any],
    *,
    encoder_hidden_size: int | None = None,
    device: str = "cpu",
    half: bool = False,
) -> Path:
    """A BLIP captioner with random weights around `tokenizer` (a BERT tokenizer with "[DEC]" as bos),
    initialised on `device` and saved with its processor in `out` (in float16 with `half`)."""
    # torch and transformers only to build a set: a cached one (the usual case) needs neither
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    out.mkdir(parents=True, exist_ok=True)
    bos = tokenizer.convert_tokens_to_ids("[DEC]")
    text_config = {
        "vocab_size": len(tokenizer),
        "num_attention_heads": 12,  # bert-base's (BlipTextConfig defaults to 8)
        "bos_token_id": bos,
        "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    if encoder_hidden_size is not None:  # cross-attention reads image embeddings of this width
        text_config["encoder_hidden_size"] = encoder_hidden_size
    config = BlipConfig(text_config=text_config, vision_config=vision_config)
    torch.manual_seed(0)
    with torch.device(device):
        model = BlipForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = tokenizer.sep_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    (model.half() if half else model).save_pretrained(out)
    image_processor = BlipImageProcessorPil(size={"height": 384, "width": 384})  # CLIP mean/std by default
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def build_blip_base(out: Path, tiny_caption: Path) -> Path:
    """BLIP-base captioning: BlipConfig's defaults are the base model (ViT-B/16 at 384 px, BERT-base);
    the only departure is the tiny tokenizer's vocabulary."""
    from transformers import BertTokenizer  # only to build the set: a cached one needs none

    # BlipVisionConfig's default init (1e-10) embeds every image the same; a real init does not
    return save_blip(out, BertTokenizer.from_pretrained(tiny_caption), {"initializer_range": 0.02})


def build_blip_large(out: Path, tiny_caption: Path, device: str = "cpu") -> Path:
    """BLIP-large captioning (Salesforce/blip-image-captioning-large's shape: ViT-L/16 at 384 px, BERT-base
    decoder), random weights initialised on `device` (fast on a GPU) and saved in float16."""
    from transformers import BertTokenizer  # only to build the set: a cached one needs none

    tokenizer = BertTokenizer.from_pretrained(tiny_caption)
    return save_blip(out, tokenizer, BLIP_LARGE_VISION, encoder_hidden_size=1024, device=device, half=True)


def build_vit_base_moderation(out: Path) -> Path:
    """ViT-B/16 224 px classifier with the labels of Falconsai/nsfw_image_detection (ViTConfig defaults)."""
    # torch and transformers only to build a set: a cached one (the usual case) needs neither
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    out.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(id2label=dict(MODERATION_LABELS), label2id={v: k for k, v in MODERATION_LABELS.items()})
    torch.manual_seed(0)
    ViTForImageClassification(config).eval().save_pretrained(out)
    ViTImageProcessorPil(
        size={"height": 224, "width": 224}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    ).save_pretrained(out)
    return out


def build_clip_b32_tags(out: Path, tiny_tags: Path) -> Path:
    """CLIP ViT-B/32 (CLIPConfig defaults: 512-wide text, 768-wide vision, 224 px)."""
    # torch and transformers only to build a set: a cached one (the usual case) needs neither
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_tags)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    )
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(out)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out
