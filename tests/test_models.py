"""Model runners on tiny real checkpoints: thresholds, top-k, signatures, failure isolation."""

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from imagemill.core.errors import ErrorKind, ModelLoadError
from imagemill.core.images import file_uri
from imagemill.core.schemas import ImageRef
from imagemill.core.settings import Settings
from imagemill.core.tasks import TASKS, Task
from imagemill.pipeline.engine import Engine
from imagemill.pipeline.models import load_runners, runner_class
from imagemill.pipeline.models.device import pins_memory, resolve_device, resolve_dtype
from imagemill.pipeline.models.moderation import ModerationRunner
from imagemill.pipeline.models.runner import ModelId, Runner, weights_hash
from imagemill.pipeline.models.zero_shot import TagOptions
from tests.fixtures.images import photo_image
from tests.fixtures.tiny_models import build_tags_siglip_with_bias, quiet_transformers


def settings_for(models: dict[str, Path], **overrides) -> Settings:
    base = {
        "caption_model": str(models["caption"]),
        "moderation_model": str(models["moderation"]),
        "tags_model": str(models["tags"]),
        "device": "cpu",
        "caption_max_new_tokens": 5,
        "batch_size": 4,
    }
    return Settings(**{**base, **overrides})


def pictures(n: int = 3) -> list[Image.Image]:
    return [photo_image(96, 64, seed=i) for i in range(n)]


def test_moderation_records_every_label_and_flags_by_threshold(tiny_models) -> None:
    (never,) = load_runners(settings_for(tiny_models, moderation_thresholds={"nsfw": 1.01}), (Task.MODERATION,))
    (always,) = load_runners(settings_for(tiny_models, moderation_thresholds={"nsfw": 0.0}), (Task.MODERATION,))
    for result in never.run(pictures()):
        assert set(result.scores) == {"normal", "nsfw"}
        assert sum(result.scores.values()) == pytest.approx(1.0, abs=1e-4)
        assert not result.flagged
    assert all(result.flagged for result in always.run(pictures()))


def test_flagged_comes_from_the_thresholded_labels_only_at_or_over_their_limit(tiny_models) -> None:
    (runner,) = load_runners(settings_for(tiny_models, moderation_thresholds={"nsfw": 0.5}), (Task.MODERATION,))
    assert runner.labels == ["normal", "nsfw"]  # rows below are in this order
    # a confident label without a threshold never flags, however high its score
    assert not runner._judge([0.99, 0.01]).flagged
    assert not runner._judge([0.500001, 0.499999]).flagged
    # the limit itself flags (>=), just under it does not
    assert runner._judge([0.5, 0.5]).flagged
    assert runner._judge([0.01, 0.99]).flagged


@pytest.mark.parametrize(
    ("thresholds", "row", "flagged"),
    [
        ({"nsfw": 0.5}, [0.99, 0.01], False),  # a label without a threshold never flags
        ({"nsfw": 0.5}, [0.5, 0.5], True),  # the limit itself flags
        ({"nsfw": 0.5}, [0.500001, 0.499999], False),
        ({"nsfw": 0.5}, [0.01, 0.99], True),  # over the limit flags too
        ({"nsfw": 0.5}, [0.1234567, 0.8765433], True),  # scores are kept to 6 places
        ({"nsfw": 0.9, "normal": 0.99}, [0.95, 0.05], False),  # every threshold is its own label's
        ({"nsfw": 0.9, "normal": 0.95}, [0.95, 0.05], True),  # any thresholded label at its limit flags
        ({}, [0.0, 1.0], False),  # no thresholds: nothing is flagged
    ],
)
def test_judging_one_row_of_scores(thresholds: dict[str, float], row: list[float], flagged: bool) -> None:
    """The threshold rule alone, without a model (fast: what `python -m tools.mutation` runs)."""
    runner = ModerationRunner.__new__(ModerationRunner)  # no model: `_judge` reads only these
    runner.labels, runner.thresholds, runner.model_id = ["normal", "nsfw"], thresholds, ModelId("m", "r")
    judged = runner._judge(row)
    assert judged.flagged is flagged
    assert judged.scores == {"normal": round(row[0], 6), "nsfw": round(row[1], 6)}
    assert (judged.model, judged.revision) == ("m", "r")
    with pytest.raises(ValueError):  # a row that does not match the labels is a bug, never a silent misreading
        runner._judge(row[:1])


def test_thresholds_must_name_a_label_the_model_has(tiny_models) -> None:
    with pytest.raises(ModelLoadError, match="porn"):
        load_runners(settings_for(tiny_models, moderation_thresholds={"porn": 0.5}), (Task.MODERATION,))


@pytest.mark.parametrize("model", ["tags", "tags_siglip"])
def test_tags_are_top_k_above_threshold_in_score_order(tiny_models, model: str) -> None:
    settings = settings_for(tiny_models, tags_model=str(tiny_models[model]), tags_top_k=4, tags_threshold=0.0)
    (runner,) = load_runners(settings, (Task.TAGS,))
    vocabulary = settings.vocabulary
    for result in runner.run(pictures()):
        scores = [label.score for label in result.labels]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        assert all(label.tag in vocabulary for label in result.labels)
    (strict,) = load_runners(settings.model_copy(update={"tags_threshold": 1.0}), (Task.TAGS,))
    assert all(result.labels == [] for result in strict.run(pictures()))
    # a score at the threshold itself is kept (scores are stored rounded, so the threshold can equal one)
    first = runner.run(pictures(1))[0].labels
    (at,) = load_runners(settings.model_copy(update={"tags_threshold": first[1].score}), (Task.TAGS,))
    assert at.run(pictures(1))[0].labels == first[:2]


def test_a_tag_longer_than_the_text_tower_reads_is_cut_to_fit_not_refused(tiny_models, tmp_path: Path) -> None:
    words = tmp_path / "words.txt"
    words.write_text("dog\ncat\n" + " ".join(["enormous"] * 400) + " beach\n")
    settings = settings_for(tiny_models, tags_vocabulary=words, tags_top_k=3, tags_threshold=0.0)
    (runner,) = load_runners(settings, (Task.TAGS,))
    (result,) = runner.run(pictures()[:1])
    assert len(result.labels) == 3


@pytest.fixture(scope="module")
def siglip_with_bias(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with quiet_transformers():
        return build_tags_siglip_with_bias(tmp_path_factory.mktemp("models") / "siglip-bias")


@pytest.mark.parametrize("model", ["tags", "tags_siglip_with_bias"])
def test_tag_scores_are_the_models_own_zero_shot_probabilities(
    tiny_models, siglip_with_bias: Path, model: str, tmp_path: Path
) -> None:
    """Tags and retag share the scorer, so only the model itself can say it is right: CLIP's
    `logits_per_image` softmaxed over the vocabulary, SigLIP's (temperature and bias in) through a sigmoid."""
    path = siglip_with_bias if model == "tags_siglip_with_bias" else tiny_models[model]
    words = ["dog", "cat", "beach", "sky", "car", "tree"]
    vocabulary = tmp_path / "tags.txt"
    vocabulary.write_text("\n".join(words))
    settings = settings_for(
        tiny_models, tags_model=str(path), tags_vocabulary=vocabulary, tags_top_k=len(words), tags_threshold=0.0
    )
    (runner,) = load_runners(settings, (Task.TAGS,))
    sigmoid = runner.model.config.model_type == "siglip"
    # neither is the neutral exp(0) = 1 nor a zero bias, or a scorer without them would pass
    assert runner.model.logit_scale.exp().item() > 2 and (not sigmoid or runner.model.logit_bias.item() < -1)
    pixels = runner.batch([runner.preprocess(picture) for picture in pictures()])
    prompts = [settings.tags_prompt.format(word) for word in words]
    tokens = runner.processor.tokenizer(
        prompts, padding="max_length" if sigmoid else True, truncation=True, return_tensors="pt"
    )
    with torch.inference_mode():
        logits = runner.model(**tokens, pixel_values=pixels).logits_per_image
    expected = logits.sigmoid() if sigmoid else logits.softmax(dim=-1)
    for tags, row in zip(runner.infer(pixels), expected.tolist(), strict=True):
        # stored to six decimals: within rounding (5e-7) and float32 noise of the model's own
        assert {label.tag: label.score for label in tags.labels} == pytest.approx(
            dict(zip(words, row, strict=True)), abs=1e-6
        )
        assert all(label.score == round(label.score, 6) for label in tags.labels)


def test_tag_text_embeddings_are_computed_once_per_vocabulary(tiny_models, tmp_path: Path) -> None:
    vocabulary = tmp_path / "tags.txt"
    vocabulary.write_text("dog\ncat\n\n# comment\ndog\nbeach\n")
    (runner,) = load_runners(settings_for(tiny_models, tags_vocabulary=vocabulary), (Task.TAGS,))
    assert runner.vocabulary == ["dog", "cat", "beach"]
    assert runner.text_embeddings.shape[0] == 3
    assert torch.allclose(runner.text_embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_captions_are_batched_and_bounded(tiny_models) -> None:
    (runner,) = load_runners(settings_for(tiny_models, caption_max_new_tokens=3), (Task.CAPTION,))
    results = runner.run(pictures(5))
    assert len(results) == 5
    assert all(0 < len(result.text.split()) <= 3 for result in results)


def test_the_revision_of_a_local_model_is_a_hash_of_its_weights(tiny_models, tmp_path: Path) -> None:
    (runner,) = load_runners(settings_for(tiny_models), (Task.MODERATION,))
    assert runner.model_id.revision == weights_hash(tiny_models["moderation"])
    assert runner.model_id.revision.startswith("sha256:")
    assert weights_hash(tiny_models["caption"]) != runner.model_id.revision


def test_signature_changes_with_outputs_settings_not_with_batch_size(tiny_models) -> None:
    tasks = (Task.MODERATION, Task.TAGS)
    base = Engine(settings_for(tiny_models), tasks).signature
    assert Engine(settings_for(tiny_models, batch_size=9), tasks).signature == base
    assert Engine(settings_for(tiny_models, moderation_thresholds={"nsfw": 0.9}), tasks).signature != base
    assert Engine(settings_for(tiny_models, tags_top_k=2), tasks).signature != base
    assert Engine(settings_for(tiny_models), (Task.MODERATION,)).signature != base


def test_signature_changes_with_vocabulary_prompt_caption_length_and_beams(tiny_models, tmp_path: Path) -> None:
    tasks = (Task.CAPTION, Task.TAGS)
    words = tmp_path / "words.txt"
    words.write_text("dog\ncat\nbeach\n")
    reordered = tmp_path / "reordered.txt"
    reordered.write_text("cat\ndog\nbeach\n")
    variants = {
        "base": {"tags_vocabulary": words},
        "vocabulary": {"tags_vocabulary": reordered},
        "prompt": {"tags_vocabulary": words, "tags_prompt": "a picture of {}"},
        "caption length": {"tags_vocabulary": words, "caption_max_new_tokens": 6},
        "beams": {"tags_vocabulary": words, "caption_num_beams": 2},
        "tag threshold": {"tags_vocabulary": words, "tags_threshold": 0.5},
    }
    signatures = {
        name: Engine(settings_for(tiny_models, **options), tasks).signature for name, options in variants.items()
    }
    assert len(set(signatures.values())) == len(variants), signatures
    # and the same settings give the same signature (nothing random or time-dependent enters it)
    assert Engine(settings_for(tiny_models, tags_vocabulary=words), tasks).signature == signatures["base"]


def test_the_signature_names_the_tag_vocabulary_by_the_first_16_hex_digits_of_its_sha256() -> None:
    # stored in every record's signature: another length or hash would make every stored record stale
    options = TagOptions(("dog", "cat"), "a photo of {}", 5, 0.1)
    assert options.signature_options() == {
        "vocabulary": hashlib.sha256(b"dog\ncat").hexdigest()[:16],
        "prompt": "a photo of {}",
        "top_k": 5,
        "threshold": 0.1,
    }


def test_tag_options_cannot_change_once_made_as_the_signature_was_taken_from_them() -> None:
    options = TagOptions(("dog",), "a photo of {}", 5, 0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.top_k = 1  # type: ignore[misc]


def test_one_image_that_breaks_a_model_fails_alone(tiny_models, tmp_path: Path) -> None:
    widths = [160, 170, 180, 190]
    for width in widths:
        picture = photo_image(width, 120, seed=width) if width != 180 else Image.new("RGB", (width, 120))
        picture.save(tmp_path / f"{width}.png")
    engine = Engine(settings_for(tiny_models), (Task.MODERATION,))
    runner = engine.runners[0]
    real_infer = runner.infer

    def fragile(pixels: torch.Tensor):
        # stands in for a model that crashes on one input: the flat black picture
        if any(float(row.std()) == 0.0 for row in pixels):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return real_infer(pixels)

    runner.infer = fragile
    refs = [ImageRef(uri=file_uri(tmp_path / f"{width}.png")) for width in widths]
    records = list(engine.annotate(refs))
    kinds = [r.error.kind if r.error else None for r in records]
    assert kinds == [None, None, ErrorKind.MODEL_FAILED, None]
    assert "device-side assert" in records[2].error.message
    assert [r.moderation is not None for r in records] == [True, True, False, True]


def test_auto_device_is_cpu_without_a_gpu_and_dtype_follows_the_device() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(tiny_models) -> None:
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_runners(settings_for(tiny_models, device="cuda"), (Task.MODERATION,))


@pytest.mark.parametrize("model", ["caption", "moderation", "tags", "tags_siglip"])
def test_preprocessing_on_decode_threads_equals_the_hugging_face_processor(tiny_models, model: str) -> None:
    from transformers import AutoImageProcessor

    from imagemill.pipeline.prepare.preprocess import from_processor

    processor = AutoImageProcessor.from_pretrained(tiny_models[model])
    recipe = from_processor(processor)
    assert recipe is not None
    for width, height in [(320, 240), (240, 320), (97, 131), (64, 64)]:
        picture = photo_image(width, height, seed=width)
        expected = processor(images=[picture], return_tensors="np")["pixel_values"][0]
        assert recipe(picture).shape == expected.shape
        assert abs(recipe(picture) - expected).max() < 1e-4


def test_a_small_cpu_batch_runs_each_model_on_one_thread_and_a_large_one_on_torchs(tiny_models, tmp_path: Path) -> None:
    """A batch of one image (an upload's chunk) on two threads waits for the second thread at every
    tiny operation: on one, the models' fixed cost per batch is a fraction of it."""
    for i in range(40):
        photo_image(96, 64, seed=i).save(tmp_path / f"{i:02d}.png")
    engine = Engine(settings_for(tiny_models, batch_size=40), (Task.MODERATION, Task.TAGS))
    threads: list[tuple[int, int]] = []
    for runner in engine.runners:
        infer = runner.infer

        def counted(pixels: torch.Tensor, infer=infer):
            threads.append((len(pixels), torch.get_num_threads()))
            return infer(pixels)

        runner.infer = counted
    assert all(r.one_thread_for(1) and not r.one_thread_for(40) for r in engine.runners)  # the tiny models
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        list(engine.annotate([ImageRef(uri=file_uri(tmp_path / "00.png"))]))
        list(engine.annotate([ImageRef(uri=file_uri(path)) for path in sorted(tmp_path.glob("*.png"))]))
        assert threads == [(1, 1), (1, 1), (40, 2), (40, 2)]
        assert torch.get_num_threads() == 2  # given back after each small batch
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize(
    ("scale", "mean", "std"),
    [(1 / 255, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)), (1 / 255, None, None)],
)
def test_the_byte_table_gives_the_arithmetics_floats_bit_for_bit(scale, mean, std) -> None:
    """An RGB picture is normalised by looking its bytes up: the same float32 operations, once per byte
    value, so every pixel of every picture is bit for bit what the arithmetic on the picture gives."""
    import numpy as np

    from imagemill.pipeline.prepare.preprocess import Preprocessor

    recipe = Preprocessor((64, 64), None, None, int(Image.Resampling.BICUBIC), scale, mean, std)
    every_byte = np.arange(256 * 3, dtype=np.uint8).reshape(16, 16, 3)  # each value in each channel
    for picture in (Image.fromarray(every_byte), photo_image(97, 131, seed=3)):
        resized = picture.resize((64, 64), resample=Image.Resampling.BICUBIC)
        arithmetic = np.asarray(resized, dtype=np.float32) * np.float32(scale)
        if mean is not None:
            arithmetic = (arithmetic - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
        looked_up = recipe(picture)
        assert looked_up.dtype == np.float32 and looked_up.flags.c_contiguous
        assert looked_up.tobytes() == np.ascontiguousarray(arithmetic.transpose(2, 0, 1)).tobytes()


def test_batches_are_pinned_and_copied_asynchronously_only_towards_a_gpu() -> None:
    assert pins_memory(torch.device("cuda:0")) and not pins_memory(torch.device("cpu"))


def test_runners_infer_without_autograd_in_the_configured_dtype(tiny_models) -> None:
    (runner,) = load_runners(settings_for(tiny_models, dtype="bfloat16"), (Task.MODERATION,))
    pixels = runner.batch([runner.preprocess(picture) for picture in pictures(2)])
    assert pixels.dtype == torch.bfloat16 and next(runner.model.parameters()).dtype == torch.bfloat16
    with torch.enable_grad():
        assert len(runner.infer(pixels)) == 2  # inference_mode inside: no graph is built


@pytest.mark.parametrize("task", list(TASKS))
def test_the_task_table_names_each_tasks_own_runner(task: Task) -> None:
    kind = runner_class(task)
    assert issubclass(kind, Runner) and kind.task is task


@pytest.mark.parametrize("task", list(TASKS))
def test_every_runner_runs_its_model_in_inference_mode(tiny_models, task: Task) -> None:
    """Every module call a runner makes (tags' text embeddings at load included) is in inference mode:
    its outputs are inference tensors (no autograd graph, no version counters) even under enable_grad."""
    calls: list[tuple[str, bool, bool]] = []

    def record(module: torch.nn.Module, _args: object, output: object) -> None:
        tensor = output if isinstance(output, torch.Tensor) else getattr(output, "last_hidden_state", None)
        if isinstance(tensor, torch.Tensor):
            calls.append((type(module).__name__, torch.is_inference_mode_enabled(), tensor.is_inference()))

    with torch.enable_grad():
        handle = torch.nn.modules.module.register_module_forward_hook(record)
        try:
            (runner,) = load_runners(settings_for(tiny_models), (task,))
            runner.run(pictures(2))
        finally:
            handle.remove()
    assert calls, "the hook saw no module calls"
    outside = [name for name, enabled, inference in calls if not (enabled and inference)]
    assert outside == [], f"{task}: modules run outside inference mode: {sorted(set(outside))}"


@pytest.mark.parametrize("task", [Task.MODERATION, Task.TAGS])
def test_vision_encoders_use_scaled_dot_product_attention(tiny_models, task: Task) -> None:
    (runner,) = load_runners(settings_for(tiny_models), (task,))
    assert runner.model.config._attn_implementation == "sdpa"


def test_model_threads_sleep_when_idle_instead_of_spinning_against_decoding() -> None:
    import subprocess
    import sys

    code = "import os, imagemill.pipeline.engine; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"},
    )
    assert out.stdout.strip() == "PASSIVE"
