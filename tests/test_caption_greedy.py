"""BLIP's lean greedy loop: captions token for token those of `generate()`, or `generate()` itself."""

from pathlib import Path

import numpy as np
import torch

from imagemill.core.images import file_uri
from imagemill.core.schemas import ImageRef
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task
from imagemill.pipeline.engine import Engine
from imagemill.pipeline.models import load_runners
from imagemill.pipeline.models.caption import CaptionRunner
from imagemill.pipeline.models.greedy import ONE_THREAD_MACS, BlipGreedy, blip_greedy
from tests.fixtures.images import photo_image, write_photos


def caption_runner(models: dict[str, Path], **overrides: object) -> CaptionRunner:
    settings = Settings(**{"caption_model": str(models["caption"]), "device": "cpu", **overrides})
    (runner,) = load_runners(settings, (Task.CAPTION,))
    assert isinstance(runner, CaptionRunner)
    return runner


def photo_batch(runner: CaptionRunner, count: int, seed: int = 0) -> torch.Tensor:
    pictures = [photo_image(96, 64, seed=seed + i) for i in range(count)]
    return runner.batch([runner.preprocess(picture) for picture in pictures])


def plain_generate(runner: CaptionRunner, pixels: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    with torch.inference_mode():
        tokens: torch.Tensor = runner.model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens, num_beams=1)
    return tokens


def test_blip_greedy_captions_are_token_for_token_those_of_generate(tiny_models: dict[str, Path]) -> None:
    runner = caption_runner(tiny_models)  # the default length, 30 new tokens
    assert runner.greedy is not None
    # 64 rows run on one thread (small products), 240 on torch's threads: both equal generate on its threads
    assert 64 * runner.greedy.macs_per_image < ONE_THREAD_MACS < 240 * runner.greedy.macs_per_image
    for count in (1, 64, 240):
        pixels = photo_batch(runner, count)
        with torch.inference_mode():
            ours = runner.greedy.generate(pixels, runner.max_new_tokens)
        theirs = plain_generate(runner, pixels, runner.max_new_tokens)
        assert torch.equal(ours, theirs), f"a batch of {count}"
    texts = [caption.text for caption in runner.infer(pixels)]
    assert texts == [t.strip() for t in runner.processor.batch_decode(theirs, skip_special_tokens=True)]
    assert len(set(texts)) > 1  # distinct pictures, distinct captions: the comparison could fail


def test_rows_that_reach_the_end_token_end_as_generate_ends_them(tiny_models: dict[str, Path]) -> None:
    runner = caption_runner(tiny_models)
    pixels = photo_batch(runner, 32, seed=100)
    first = plain_generate(runner, pixels, 12)
    # the random tiny model never says its end token: make a word it says in some rows the end
    words, counts = np.unique(first[:, 2:].numpy(), return_counts=True)
    text = runner.model.config.text_config
    text.sep_token_id = int(words[np.argmax(counts)])
    greedy = BlipGreedy(runner.model)
    assert greedy.eos == text.sep_token_id and greedy.agrees()
    for length in (3, 12, 25):
        with torch.inference_mode():
            ours = greedy.generate(pixels, length)
        theirs = plain_generate(runner, pixels, length)
        assert torch.equal(ours, theirs), f"{length} new tokens"
    # rows ended at different steps, and the finished ones were padded while the rest went on
    ended = (theirs == text.sep_token_id).any(dim=1)
    assert ended.any() and not ended.all() and (theirs == text.pad_token_id).any()


def test_records_of_the_lean_loop_are_those_of_generate(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    paths = write_photos(tmp_path, 70, 160, 120)
    refs = [ImageRef(uri=file_uri(path)) for path in paths]
    settings = Settings(
        caption_model=str(tiny_models["caption"]),
        moderation_model=str(tiny_models["moderation"]),
        tags_model=str(tiny_models["tags"]),
        device="cpu",
        batch_size=64,  # a full batch and a short one
    )
    tasks = (Task.CAPTION, Task.MODERATION, Task.TAGS)
    with Engine(settings, tasks) as engine:
        caption = next(r for r in engine.runners if isinstance(r, CaptionRunner))
        assert caption.greedy is not None
        lean = [record.model_dump(exclude={"timings", "processed_at"}) for record in engine.annotate(refs)]
        caption.greedy = None  # the plain path: the model's own generate()
        plain = [record.model_dump(exclude={"timings", "processed_at"}) for record in engine.annotate(refs)]
    assert lean == plain
    assert len(lean) == 70 and all(record["caption"]["text"] for record in lean)


def test_generate_runs_where_the_lean_loop_is_not_shown_to_be_equal(tiny_models: dict[str, Path]) -> None:
    runner = caption_runner(tiny_models, caption_num_beams=3)
    assert runner.greedy is None  # beam search: generate's
    model = caption_runner(tiny_models).model
    assert blip_greedy(model, 1, 65)[0] is None  # past the decoder's 64 positions: generate says how that fails
    model.text_decoder.generation_config.repetition_penalty = 1.3
    assert blip_greedy(model, 1, 30) == (None, "the generation config sets repetition_penalty")
    model.text_decoder.generation_config.repetition_penalty = 1.0
    greedy, _ = blip_greedy(model, 1, 30)
    assert greedy is not None
    greedy.scale *= 2  # a transcription that drifted from the model's code: the probe at load notices
    assert not greedy.agrees()
