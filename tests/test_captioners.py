"""Captioners beside BLIP: Florence-2's task prompts, a chat VLM's prompt, the path from the config, fast generation."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import (
    BlipForConditionalGeneration,
    Florence2ForConditionalGeneration,
    SmolVLMForConditionalGeneration,
)

from imagemill.core.errors import ModelLoadError
from imagemill.core.images import file_uri
from imagemill.core.schemas import ImageRef
from imagemill.core.settings import Settings, SettingsError
from imagemill.core.sinks.files import read_records
from imagemill.core.tasks import Task
from imagemill.pipeline.engine import Engine
from imagemill.pipeline.models import load_runners
from imagemill.pipeline.models.caption import CHAT_PROMPT, video_dependencies_missing
from imagemill.pipeline.models.generation import generation_plan
from tests.fixtures.cli import run_cli
from tests.fixtures.images import photo_image, write_photos
from tests.fixtures.tiny_models import IMAGE_SIZE, build_caption_chat, build_caption_florence, quiet_transformers

CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def florence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with quiet_transformers():
        return build_caption_florence(tmp_path_factory.mktemp("models") / "florence2-caption")


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with quiet_transformers():
        return build_caption_chat(tmp_path_factory.mktemp("models") / "smolvlm-caption")


@pytest.fixture(scope="module")
def captioners(florence: Path, chat: Path) -> dict[str, Path]:
    return {"florence": florence, "chat": chat}


def caption_settings(model: Path, **overrides: object) -> Settings:
    return Settings(**{"caption_model": str(model), "device": "cpu", "caption_max_new_tokens": 4, **overrides})


def test_florence_captions_name_their_task_prompt(florence: Path) -> None:
    (default,) = load_runners(caption_settings(florence), (Task.CAPTION,))
    (ocr,) = load_runners(caption_settings(florence, caption_prompt="<OCR>"), (Task.CAPTION,))
    pictures = [photo_image(96, 64, seed=i) for i in range(3)]
    for runner, prompt in ((default, "<CAPTION>"), (ocr, "<OCR>")):
        captions = runner.run(pictures)
        assert [c.prompt for c in captions] == [prompt] * 3
        # post-processed by Florence-2's processor: its special tokens never reach the record
        assert all(c.text and "</s>" not in c.text and "<s>" not in c.text for c in captions)
        assert runner.options()["prompt"] == prompt


def test_chat_captions_answer_the_prompt_with_only_the_new_tokens(chat: Path) -> None:
    (default,) = load_runners(caption_settings(chat), (Task.CAPTION,))
    (asked,) = load_runners(caption_settings(chat, caption_prompt="What is in the picture?"), (Task.CAPTION,))
    pictures = [photo_image(96, 64, seed=i) for i in range(3)]
    for runner, prompt in ((default, CHAT_PROMPT), (asked, "What is in the picture?")):
        captions = runner.run(pictures)
        assert [c.prompt for c in captions] == [prompt] * 3
        # a byte per token in the tiny vocabulary, so at most a character each: the prompt and the chat
        # template (tens of characters) were not decoded with the answer
        assert all(0 < len(c.text) <= 4 for c in captions)
    # one tile per image (tiling off): the same tokens for every image, a batch of equal lengths
    assert not default.image_processor.do_image_splitting
    assert default.min_side == IMAGE_SIZE
    # made straight from the picture, it is what the processor makes by way of its longest edge
    picture = photo_image(160, 120)
    ours = default.preprocess(picture)
    theirs = default.image_processor(images=[picture], return_tensors="np")["pixel_values"][0][0]
    assert ours.shape == theirs.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert np.abs(ours - theirs).max() < 0.05 and np.abs(ours - theirs).mean() < 0.01  # in [-1, 1] units


def test_a_smolvlm2_processor_that_cannot_load_names_what_to_install(chat: Path, tmp_path: Path) -> None:
    # SmolVLM2's hub checkpoints name SmolVLMProcessor, which loads a video processor too
    checkpoint = tmp_path / "smolvlm2"
    shutil.copytree(chat, checkpoint)
    for name in ("processor_config.json", "tokenizer_config.json"):
        config = json.loads((checkpoint / name).read_text())
        (checkpoint / name).write_text(json.dumps({**config, "processor_class": "SmolVLMProcessor"}))
    missing = video_dependencies_missing()
    if missing:
        with pytest.raises(ModelLoadError) as raised:
            load_runners(caption_settings(checkpoint), (Task.CAPTION,))
        assert str(raised.value).endswith(f"; SmolVLM2's processor also needs: pip install {' '.join(missing)}")
        assert "\n" not in str(raised.value)
    else:  # where both are installed, the checkpoint loads like any other
        (runner,) = load_runners(caption_settings(checkpoint), (Task.CAPTION,))
        assert runner.family == "chat"


def test_blip_takes_no_prompt_and_its_signature_options_are_unchanged(tiny_models: dict[str, Path]) -> None:
    (blip,) = load_runners(caption_settings(tiny_models["caption"]), (Task.CAPTION,))
    assert blip.options() == {"max_new_tokens": 4, "num_beams": 1}  # no prompt key: old BLIP stores still match
    assert all(c.prompt is None and c.text for c in blip.run([photo_image(96, 64)]))


@pytest.mark.parametrize(
    ("model", "prompt"),
    [("florence", "<OD>"), ("florence", "<CAPTION> of a dog"), ("chat", "<CAPTION>"), ("blip", "a picture of")],
)
def test_a_prompt_the_model_cannot_take_is_a_settings_error_naming_the_variable(
    captioners: dict[str, Path], tiny_models: dict[str, Path], model: str, prompt: str
) -> None:
    folder = captioners[model] if model in captioners else tiny_models["caption"]
    with pytest.raises(SettingsError) as raised:
        load_runners(caption_settings(folder, caption_prompt=prompt), (Task.CAPTION,))
    message = str(raised.value)
    assert message.startswith(f"IMAGEMILL_CAPTION_PROMPT={prompt!r}: ") and "\n" not in message


def test_generation_plan_per_model_family_and_device() -> None:
    florence, blip, chat = (
        Florence2ForConditionalGeneration,
        BlipForConditionalGeneration,
        SmolVLMForConditionalGeneration,
    )
    # the flag transformers sets on a model whose forward compiles as one graph decides "supported"
    auto_gpu = generation_plan("auto", GPU, florence)  # type: ignore[arg-type]  # the class carries the flag
    assert (auto_gpu.static_cache, auto_gpu.compiled) == (True, True)
    assert auto_gpu.generate_kwargs() == {"cache_implementation": "static"}
    assert not generation_plan("auto", CPU, florence).static_cache  # type: ignore[arg-type]
    on_cpu = generation_plan("on", CPU, florence)  # type: ignore[arg-type]
    assert (on_cpu.static_cache, on_cpu.compiled) == (True, False)  # transformers compiles on GPUs only
    for setting in ("auto", "on"):  # BLIP's and SmolVLM's forwards do not compile whole in transformers
        assert generation_plan(setting, GPU, blip).generate_kwargs() == {}  # type: ignore[arg-type]
        assert generation_plan(setting, GPU, chat).generate_kwargs() == {}  # type: ignore[arg-type]
    assert generation_plan("off", GPU, florence).generate_kwargs() == {}  # type: ignore[arg-type]


def test_static_cache_generates_what_the_dynamic_cache_does(florence: Path) -> None:
    pictures = [photo_image(96, 64, seed=i) for i in range(4)]
    (dynamic,) = load_runners(caption_settings(florence, caption_compile="off"), (Task.CAPTION,))
    (static,) = load_runners(caption_settings(florence, caption_compile="on"), (Task.CAPTION,))  # no compile on CPU
    assert static.plan.static_cache and not dynamic.plan.static_cache
    assert [c.text for c in static.run(pictures)] == [c.text for c in dynamic.run(pictures)]


@pytest.mark.parametrize(
    ("model", "prompts"), [("florence", ("<CAPTION>", "<DETAILED_CAPTION>")), ("chat", ("Describe it.", "Any text?"))]
)
def test_the_prompt_enters_the_signature(
    captioners: dict[str, Path], model: str, prompts: tuple[str, str], tmp_path: Path
) -> None:
    paths = write_photos(tmp_path, 2, 96, 64)
    refs = [ImageRef(uri=file_uri(p)) for p in paths]
    signatures = {}
    for prompt in prompts:
        settings = caption_settings(captioners[model], caption_prompt=prompt, fetch_threads=2, decode_threads=1)
        with Engine(settings, (Task.CAPTION,)) as engine:
            records = list(engine.annotate(refs))
        assert [r.uri for r in records] == [r.uri for r in refs]
        assert all(r.caption is not None and r.caption.prompt == prompt for r in records)
        signatures[prompt] = records[0].signature
    assert signatures[prompts[0]] != signatures[prompts[1]]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "prompt"), [("florence", "<MORE_DETAILED_CAPTION>"), ("chat", "Any text here?")])
def test_annotate_writes_the_prompt_to_parquet(
    captioners: dict[str, Path], model: str, prompt: str, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    write_photos(folder, 3, 160, 120)
    out = tmp_path / "captions.parquet"
    env = {"IMAGEMILL_CAPTION_MODEL": str(captioners[model]), "IMAGEMILL_CAPTION_PROMPT": prompt}
    result = run_cli("annotate", str(folder), "--tasks", "caption", "--out", str(out), "-q", env=env)
    assert result.returncode == 0, result.stderr
    records = read_records(out)
    assert len(records) == 3 and all(r.error is None and r.caption and r.caption.prompt == prompt for r in records)
    assert pq.read_schema(out).field("caption").type.get_field_index("prompt") >= 0


@pytest.mark.slow
def test_annotate_refuses_a_prompt_the_model_cannot_take_in_one_line(florence: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    write_photos(folder, 1, 160, 120)
    env = {"IMAGEMILL_CAPTION_MODEL": str(florence), "IMAGEMILL_CAPTION_PROMPT": "<OD>"}
    bad = run_cli("annotate", str(folder), "--tasks", "caption", "--out", str(tmp_path / "x.jsonl"), env=env)
    assert bad.returncode == 2 and "IMAGEMILL_CAPTION_PROMPT='<OD>'" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x.jsonl").exists()
