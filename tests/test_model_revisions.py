"""One hub revision per model: three models are three repositories, each pinned on its own."""

import pytest

from imagemill.core.pipeline_key import pipeline_key
from imagemill.core.settings import Settings
from imagemill.core.tasks import Task


@pytest.fixture(autouse=True)
def _no_revisions(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CAPTION", "MODERATION", "TAGS", "MODEL"):
        monkeypatch.delenv(f"IMAGEMILL_{name}_REVISION", raising=False)


def test_each_model_reads_its_own_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEMILL_CAPTION_REVISION", "c0ffee")
    monkeypatch.setenv("IMAGEMILL_TAGS_REVISION", "v2")
    settings = Settings()
    # the embedding is the tags model's: its revision too
    assert [settings.revision(task) for task in Task] == ["c0ffee", None, "v2", "v2"]


def test_the_deprecated_single_revision_fills_only_the_unset_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEMILL_MODEL_REVISION", "old")
    monkeypatch.setenv("IMAGEMILL_MODERATION_REVISION", "new")
    settings = Settings()
    assert [settings.revision(task) for task in Task] == ["old", "new", "old", "old"]


def test_a_revision_changes_the_pipeline_key_of_its_task_only(monkeypatch: pytest.MonkeyPatch) -> None:
    before = {task: pipeline_key((task,), Settings()) for task in Task}
    monkeypatch.setenv("IMAGEMILL_TAGS_REVISION", "v2")
    after = {task: pipeline_key((task,), Settings()) for task in Task}
    assert after[Task.TAGS] != before[Task.TAGS] and after[Task.EMBEDDING] != before[Task.EMBEDDING]
    assert after[Task.CAPTION] == before[Task.CAPTION] and after[Task.MODERATION] == before[Task.MODERATION]
