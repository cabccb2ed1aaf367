"""What each captioner costs per image:
`python -m bench.throughput.captioners --batch 4 --tokens 30 --out bench/results`.

BLIP-large (imagemill's default), Florence-2-base and SmolVLM2-256M (the smallest chat VLM imagemill
runs) at their real sizes — vision towers, text models and vocabularies — with random weights built
from configs into `bench/.cache/models/captioners/`, loaded through imagemill's own caption runner
(the path each family takes, its preprocessing, prompt and decoding). Random weights stop anywhere,
so every caption is made exactly `--tokens` long (min_new_tokens = max_new_tokens): the cost per
image is the model's at a fixed batch and length. The images are preprocessed once beforehand (that
happens on the decode threads in a run). Each model runs on `--threads` torch threads (1) and is
timed in CPU seconds as well as wall seconds: on a shared machine the wall clock measures the
neighbours, the process's CPU time much less so. The captioners take turns, `--repeats` rounds
after one warm-up each, and the best round of each is reported with the CPU other processes used
meanwhile. `--device cuda --dtype float16 --batch 64` measures a GPU the same way (by the wall
clock, with IMAGEMILL_CAPTION_COMPILE's decision, `--compile`). Not a test: it judges the machine
it ran on.
"""

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench.machine import Interference, describe, loadavg
from bench.models import BLIP_LARGE_VISION, save_blip
from bench.report import save_results
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task
from imagemill.pipeline.models import load_runners
from tests.fixtures.images import photo_image
from tests.fixtures.tiny_models import (
    SMOLVLM_CHAT_TEMPLATE,
    WORDS,
    _bytes_to_unicode,
    quiet_transformers,
    smolvlm_tokenizer,
    smolvlm_tokens,
)

CACHE = Path(__file__).parent / ".cache" / "models" / "captioners"
VERSION = 1  # bump when a builder changes, to rebuild the cached folders


def _padded(tokens: list[str], size: int) -> dict[str, int]:
    """A vocabulary of `size` entries: the tokens a tiny tokenizer needs, then fillers, so the embedding
    and output layers have the real model's size (and every id the random model emits decodes)."""
    fillers = (f"<extra_{i}>" for i in range(size))
    return {token: i for i, token in enumerate([*tokens, *(next(fillers) for _ in range(size - len(tokens)))])}


def build_blip_large(out: Path) -> None:
    """Salesforce/blip-image-captioning-large: ViT-L/16 at 384 px, BERT-base decoder, 30,524 tokens."""
    from transformers import BertTokenizer  # each family's classes only when its checkpoint is built

    vocab = _padded(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS), "[DEC]", "[ENC]"], 30524)
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", additional_special_tokens=["[ENC]"])
    save_blip(out, tokenizer, BLIP_LARGE_VISION, encoder_hidden_size=1024)


def build_florence2_base(out: Path) -> None:
    """florence-community/Florence-2-base: DaViT (Florence2VisionConfig's defaults, 768-wide projection)
    at 768 px (577 image tokens), BART-base (6 + 6 layers, 768 wide), 51,289 tokens."""
    # each family's classes only when its checkpoint is built (cached otherwise)
    from transformers import (
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    out.mkdir(parents=True, exist_ok=True)
    vocab = _padded(["<s>", "<pad>", "</s>", "<unk>", *_bytes_to_unicode().values(), "<mask>", "<image>"], 51289)
    tokenizer = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    config = Florence2Config(
        vision_config={"projection_dim": 768},
        text_config={
            "vocab_size": len(vocab),
            "d_model": 768,
            "encoder_layers": 6,
            "decoder_layers": 6,
            "encoder_attention_heads": 12,
            "decoder_attention_heads": 12,
            "encoder_ffn_dim": 3072,
            "decoder_ffn_dim": 3072,
            "max_position_embeddings": 1024,
            "bos_token_id": 0,
            "pad_token_id": 1,
            "eos_token_id": 2,
            "decoder_start_token_id": 2,
            "forced_eos_token_id": 2,
        },
        image_token_id=vocab["<image>"],
    )
    torch.manual_seed(0)
    Florence2ForConditionalGeneration(config).eval().save_pretrained(out)
    image_processor = CLIPImageProcessorPil(
        size={"height": 768, "width": 768}, do_center_crop=False, image_seq_length=577
    )
    Florence2Processor(
        image_processor=image_processor, tokenizer=tokenizer, post_processor_config={"pure_text": {}}
    ).save_pretrained(out)


def build_smolvlm2_256m(out: Path) -> None:
    """HuggingFaceTB/SmolVLM2-256M-Video-Instruct: SigLIP-B/16 at 512 px, pixel shuffle x4 (64 tokens a
    tile), SmolLM2-135M (30 layers, 576 wide, 9 heads, 3 KV heads), 49,280 tokens."""
    # each family's classes only when its checkpoint is built (cached otherwise)
    from transformers import (
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    out.mkdir(parents=True, exist_ok=True)
    vocab = _padded(smolvlm_tokens(), 49280)
    tokenizer = smolvlm_tokenizer(vocab)
    config = SmolVLMConfig(
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 512,
            "patch_size": 16,
        },
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "max_position_embeddings": 8192,
            "rope_theta": 100000.0,
            "tie_word_embeddings": True,
            "bos_token_id": vocab["<|im_start|>"],
            "eos_token_id": vocab["<end_of_utterance>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        scale_factor=4,
        image_token_id=vocab["<image>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = vocab["<end_of_utterance>"]
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    model.save_pretrained(out)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}, do_image_splitting=True
    )
    Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64, chat_template=SMOLVLM_CHAT_TEMPLATE
    ).save_pretrained(out)


@dataclass(frozen=True)
class Captioner:
    name: str
    builder: Callable[[Path], None]
    prompt: str | None


CAPTIONERS = (
    Captioner("blip-large", build_blip_large, None),
    Captioner("florence2-base", build_florence2_base, "<CAPTION>"),
    Captioner("smolvlm2-256m", build_smolvlm2_256m, "Describe this image in one sentence."),
)


def folder(captioner: Captioner, rebuild: bool) -> Path:
    out = CACHE / captioner.name
    marker = out / "built.json"
    if rebuild or not marker.is_file() or json.loads(marker.read_text()).get("version") != VERSION:
        with quiet_transformers():
            captioner.builder(out)
        marker.write_text(json.dumps({"version": VERSION}))
    return out


@dataclass
class Loaded:
    captioner: Captioner
    runner: Any
    pixels: torch.Tensor
    preprocess_ms: float
    rounds: list[dict[str, float]]


def load(captioner: Captioner, args: argparse.Namespace) -> Loaded:
    batch, tokens = args.batch, args.tokens
    settings = Settings(
        caption_model=str(folder(captioner, args.rebuild)),
        caption_prompt=captioner.prompt,
        caption_max_new_tokens=tokens,
        caption_compile=args.compile,
        device=args.device,
        dtype=args.dtype,
        batch_size=batch,
    )
    (runner,) = load_runners(settings, (Task.CAPTION,))
    runner.model.generation_config.min_new_tokens = tokens  # random weights stop anywhere: always `tokens` long
    images = [photo_image(640, 480, seed=i) for i in range(batch)]
    started = time.perf_counter()
    pixels = runner.batch([runner.preprocess(image) for image in images])
    preprocess_ms = (time.perf_counter() - started) * 1000 / batch
    runner.infer(pixels)  # warm-up: first-call allocations, lazy initialisation, compiling where it compiles
    return Loaded(captioner, runner, pixels, preprocess_ms, [])


def time_round(loaded: Loaded) -> None:
    cpu = time.process_time()
    with Interference() as seen:
        loaded.runner.infer(loaded.pixels)  # returns text: the GPU's work is done when it returns
    cpu_s = time.process_time() - cpu
    loaded.rounds.append(
        {"wall_s": round(seen.wall_s, 3), "cpu_s": round(cpu_s, 3), "others_cores": round(seen.others_cores, 2)}
    )


def summary(loaded: Loaded) -> dict[str, Any]:
    runner, batch = loaded.runner, len(loaded.pixels)
    # on a CPU its time is the model's cost; on a GPU the wall clock is (the CPU mostly waits)
    basis = "wall" if loaded.pixels.device.type == "cuda" else "cpu"
    best = min(loaded.rounds, key=lambda r: r[f"{basis}_s"])
    prompt_inputs = runner._prompt_inputs  # what the model reads before generating, image tokens included
    return {
        "captioner": loaded.captioner.name,
        "architecture": type(runner.model).__name__,
        "params_m": round(sum(p.numel() for p in runner.model.parameters()) / 1e6, 1),
        "input_px": list(loaded.pixels.shape[-2:]),
        "prompt": loaded.captioner.prompt,
        "prompt_tokens": int(prompt_inputs["input_ids"].shape[1]) if prompt_inputs else 0,
        "batch": batch,
        "new_tokens": runner.max_new_tokens,
        "preprocess_ms_per_image": round(loaded.preprocess_ms, 1),
        "basis": basis,
        "generation": {"static_cache": runner.plan.static_cache, "compiled": runner.plan.compiled},
        "ms_per_image": round(best[f"{basis}_s"] * 1000 / batch, 1),
        "cpu_ms_per_image": round(best["cpu_s"] * 1000 / batch, 1),
        "images_per_cpu_s": round(batch / best["cpu_s"], 3),
        "wall_ms_per_image": round(best["wall_s"] * 1000 / batch, 1),
        "others_cores": best["others_cores"],
        "rounds": loaded.rounds,
    }


def markdown(report: dict[str, Any]) -> str:
    rows = report["captioners"]
    blip = next((r for r in rows if r["captioner"] == "blip-large"), rows[0])
    basis = rows[0].get("basis", "cpu")
    device = report.get("device", "cpu")
    lines = [
        f"# Captioners' cost per image ({report['started']})",
        "",
        f"CPU: {report['machine'].get('cpu_model', '?')}, {report['machine'].get('cpus')} cores; device {device}; "
        f"torch {report['machine'].get('torch')}, transformers {report['machine'].get('transformers')}; "
        f"{report.get('dtype', 'float32')}, {report['threads']} torch thread(s); batch {report['batch']}, "
        f"{report['tokens']} new tokens per caption (forced); the captioners in turns, best of {report['repeats']} "
        f"rounds (by {basis} time) after a warm-up; load average at start {report['loadavg']}.",
        "",
        "| captioner | model | params (M) | input px | prompt tokens | CPU ms/image | images per CPU-second "
        "| cost vs BLIP-large | wall ms/image | others' cores |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['captioner']} | {r['architecture']} | {r['params_m']} | {r['input_px'][0]}x{r['input_px'][1]} "
            f"| {r['prompt_tokens']} | {r['cpu_ms_per_image']} | {r['images_per_cpu_s']} "
            f"| {r[f'{basis}_ms_per_image'] / blip[f'{basis}_ms_per_image']:.2f}x | {r['wall_ms_per_image']} "
            f"| {r['others_cores']} |"
        )
    lines += [
        "",
        "Prompt tokens: what the decoder (SmolVLM2) or the text encoder (Florence-2) reads before generating, "
        "image tokens included; BLIP reads none (its decoder cross-attends to the 577 image patches). The tiny "
        "byte-level tokenizers spell the prompt's words a byte a token: the real tokenizers make about 585 "
        "(Florence-2) and 81 (SmolVLM2), so these prompts cost a little more here than they will. "
        "Preprocessing (on the decode threads in a run, not in the figures above), ms/image: "
        + ", ".join(f"{r['captioner']} {r['preprocess_ms_per_image']}" for r in rows)
        + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is per core)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (then timed by the wall clock)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="IMAGEMILL_CAPTION_COMPILE")
    parser.add_argument("--only", default="", help="comma-separated captioner names (default: all)")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wanted = {name for name in args.only.split(",") if name}
    report: dict[str, Any] = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": describe(),
        "loadavg": loadavg(),
        "batch": args.batch,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
    }
    # all loaded at once (about 4 GB in float32), so the rounds can alternate between them
    loaded = [load(c, args) for c in CAPTIONERS if not wanted or c.name in wanted]
    for round_ in range(args.repeats):
        for one in loaded:
            time_round(one)
            print(json.dumps({"round": round_, "captioner": one.captioner.name, **one.rounds[-1]}), flush=True)
    report["captioners"] = [summary(one) for one in loaded]
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    save_results(args.out, "captioners", report, text)
    print(text)


if __name__ == "__main__":
    main()
