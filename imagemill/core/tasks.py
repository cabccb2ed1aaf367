"""The tasks a pipeline can be asked for, each defined once: one row of `TASKS` names its model and
revision settings, the record field and output type that hold what it makes, and its runner.

Everything that differs by task reads this table: the runners' loading, the pipeline key, the
settings' revisions, `models download`, the engine's record, the Python API. Adding a task is a row
here, its runner (`pipeline/models/`) and its output type on the record (`core/schemas.py`).
"""

import importlib
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pydantic and numpy: resolved by name when asked (`TaskSpec.output_type`)
    from imagemill.core.schemas import ModelOutput


class Task(StrEnum):
    """What can be asked of a pipeline; the order here is the order they run in."""

    CAPTION = "caption"
    MODERATION = "moderation"
    TAGS = "tags"
    EMBEDDING = "embedding"


@dataclass(frozen=True)
class TaskSpec:
    """One task's row: where its model is configured, where its output goes, what runs it."""

    task: Task
    model_setting: str  # the Settings field naming its model (hub id or directory)
    revision_setting: str  # the Settings field of that model's hub revision
    field: str  # the Record field holding its output
    output: str  # the output type: a class of `imagemill.core.schemas`, named (that module loads pydantic and numpy)
    # its runner, `module:Class` under `imagemill.pipeline.models`: named, since core cannot import the
    # layer above it, and loaded only when the task is asked for
    runner: str
    default: bool = True  # run when no tasks are named

    @property
    def model_variable(self) -> str:
        """The environment variable of its model: `IMAGEMILL_TAGS_MODEL`."""
        return f"IMAGEMILL_{self.model_setting.upper()}"

    def output_type(self) -> "type[ModelOutput]":
        """The class of its output (`Caption`, `Tags` …)."""
        # by name, when asked: schemas imports pydantic and numpy, and `imagemill --help` reads this table
        schemas = importlib.import_module("imagemill.core.schemas")
        kind: type[ModelOutput] = getattr(schemas, self.output)
        return kind


TASKS: dict[Task, TaskSpec] = {
    spec.task: spec
    for spec in (
        TaskSpec(Task.CAPTION, "caption_model", "caption_revision", "caption", "Caption", "caption:CaptionRunner"),
        TaskSpec(
            Task.MODERATION, "moderation_model", "moderation_revision", "moderation", "Moderation",
            "moderation:ModerationRunner",
        ),
        TaskSpec(Task.TAGS, "tags_model", "tags_revision", "tags", "Tags", "tags:TagsRunner"),
        # the tags model's image embedding (kilobytes per record): asked for by name
        TaskSpec(
            Task.EMBEDDING, "tags_model", "tags_revision", "embedding", "Embedding", "embedding:EmbeddingRunner",
            default=False,
        ),
    )
}  # fmt: skip

# what runs when no tasks are named
DEFAULT_TASKS = tuple(task for task, spec in TASKS.items() if spec.default)
# the Record fields of the tasks' outputs, in task order
TASK_FIELDS = tuple(spec.field for spec in TASKS.values())


def parse_tasks(text: str) -> tuple[Task, ...]:
    """`"caption,tags"` -> tasks in canonical order; raises ValueError naming an unknown task."""
    names = {part.strip().lower() for part in text.split(",") if part.strip()}
    if not names:
        raise ValueError("no tasks given; choose from " + ", ".join(t.value for t in Task))
    unknown = names - {t.value for t in Task}
    if unknown:
        known = ", ".join(t.value for t in Task)
        raise ValueError(f"unknown task {', '.join(sorted(unknown))}; choose from {known}")
    return tuple(t for t in Task if t.value in names)
