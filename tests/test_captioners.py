"""Captioners beside BLIP: Florence-2 and its task prompts, the path from the config, fast generation decisions."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import BlipForConditionalGeneration, Florence2ForConditionalGeneration

from imagemill.core.schemas import ImageRef, Task
from imagemill.core.settings import Settings, SettingsError
from imagemill.core.storage import file_uri
from imagemill.core.stores.files import read_records
from imagemill.pipeline.engine import Engine
from imagemill.pipeline.models import load_runners
from imagemill.pipeline.models.generation import generation_plan
from tests.fixtures.cli import run_cli
from tests.fixtures.images import photo_image, write_photos
from tests.fixtures.tiny_models import build_caption_florence, quiet_transformers

CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(scope="module")
def florence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with quiet_transformers():
        return build_caption_florence(tmp_path_factory.mktemp("models") / "florence2-caption")


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


def test_blip_takes_no_prompt_and_its_signature_options_are_unchanged(tiny_models: dict[str, Path]) -> None:
    (blip,) = load_runners(caption_settings(tiny_models["caption"]), (Task.CAPTION,))
    assert blip.options() == {"max_new_tokens": 4, "num_beams": 1}  # no prompt key: old BLIP stores still match
    assert all(c.prompt is None and c.text for c in blip.run([photo_image(96, 64)]))


@pytest.mark.parametrize(
    ("model", "prompt"),
    [("florence", "<OD>"), ("florence", "<CAPTION> of a dog"), ("blip", "a picture of")],
)
def test_a_prompt_the_model_cannot_take_is_a_settings_error_naming_the_variable(
    florence: Path, tiny_models: dict[str, Path], model: str, prompt: str
) -> None:
    folder = florence if model == "florence" else tiny_models["caption"]
    with pytest.raises(SettingsError) as raised:
        load_runners(caption_settings(folder, caption_prompt=prompt), (Task.CAPTION,))
    message = str(raised.value)
    assert message.startswith(f"IMAGEMILL_CAPTION_PROMPT={prompt!r}: ") and "\n" not in message


def test_generation_plan_per_model_family_and_device() -> None:
    florence, blip = Florence2ForConditionalGeneration, BlipForConditionalGeneration
    # the flag transformers sets on a model whose forward compiles as one graph decides "supported"
    auto_gpu = generation_plan("auto", GPU, florence)  # type: ignore[arg-type]  # the class carries the flag
    assert (auto_gpu.static_cache, auto_gpu.compiled) == (True, True)
    assert auto_gpu.generate_kwargs() == {"cache_implementation": "static"}
    assert not generation_plan("auto", CPU, florence).static_cache  # type: ignore[arg-type]
    on_cpu = generation_plan("on", CPU, florence)  # type: ignore[arg-type]
    assert (on_cpu.static_cache, on_cpu.compiled) == (True, False)  # transformers compiles on GPUs only
    for setting in ("auto", "on"):
        assert generation_plan(setting, GPU, blip).generate_kwargs() == {}  # type: ignore[arg-type]
    assert generation_plan("off", GPU, florence).generate_kwargs() == {}  # type: ignore[arg-type]


def test_static_cache_generates_what_the_dynamic_cache_does(florence: Path) -> None:
    pictures = [photo_image(96, 64, seed=i) for i in range(4)]
    (dynamic,) = load_runners(caption_settings(florence, caption_compile="off"), (Task.CAPTION,))
    (static,) = load_runners(caption_settings(florence, caption_compile="on"), (Task.CAPTION,))
    assert static.plan.static_cache and not dynamic.plan.static_cache
    assert [c.text for c in static.run(pictures)] == [c.text for c in dynamic.run(pictures)]


def test_the_prompt_enters_the_signature(florence: Path, tmp_path: Path) -> None:
    paths = write_photos(tmp_path, 2, 96, 64)
    refs = [ImageRef(uri=file_uri(p)) for p in paths]
    signatures = {}
    for prompt in ("<CAPTION>", "<DETAILED_CAPTION>"):
        settings = caption_settings(florence, caption_prompt=prompt, fetch_threads=2, decode_threads=1)
        with Engine(settings, (Task.CAPTION,)) as engine:
            records = list(engine.annotate(refs))
        assert [r.uri for r in records] == [r.uri for r in refs]
        assert all(r.caption is not None and r.caption.prompt == prompt for r in records)
        signatures[prompt] = records[0].signature
    assert signatures["<CAPTION>"] != signatures["<DETAILED_CAPTION>"]


def test_annotate_with_florence_writes_the_prompt_to_parquet(florence: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    write_photos(folder, 3, 160, 120)
    out = tmp_path / "captions.parquet"
    env = {"IMAGEMILL_CAPTION_MODEL": str(florence), "IMAGEMILL_CAPTION_PROMPT": "<MORE_DETAILED_CAPTION>"}
    result = run_cli("annotate", str(folder), "--tasks", "caption", "--out", str(out), "-q", env=env)
    assert result.returncode == 0, result.stderr
    records = read_records(out)
    assert len(records) == 3 and all(r.error is None for r in records)
    assert {r.caption.prompt for r in records if r.caption} == {"<MORE_DETAILED_CAPTION>"}
    assert pq.read_schema(out).field("caption").type.get_field_index("prompt") >= 0

    bad = run_cli("annotate", str(folder), "--tasks", "caption", "--out", str(tmp_path / "x.jsonl"),
                  env={**env, "IMAGEMILL_CAPTION_PROMPT": "<OD>"})  # fmt: skip
    assert bad.returncode == 2 and "IMAGEMILL_CAPTION_PROMPT='<OD>'" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x.jsonl").exists()
