"""The pipeline signature: a hash of everything that changes a record's outputs.

Each task's part (model, revision, options) hashed together; part of every record's idempotency key.
Annotation and retag compute it with the same functions, so a retagged record and a run with the
same settings for every task carry the same signature.
"""

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from imagemill.core.tasks import TASKS, Task
from imagemill.pipeline.models.runner import Runner
from imagemill.pipeline.prepare.quality import QUALITY_VERSION

SIGNATURE_VERSION = 1  # bump when the record's meaning changes for the same models

# one task's part of the signature: {"task", "model", "revision", "options"}
Part = dict[str, Any]


def task_part(task: Task, model: str, revision: str | None, options: Mapping[str, Any]) -> Part:
    """One task's part: its model as records name it, the exact weights, and its options."""
    return {"task": task.value, "model": model, "revision": revision, "options": dict(options)}


def signature_of(parts: Sequence[Part]) -> str:
    """The signature of a pipeline of these task parts, in task order."""
    spec = {"version": SIGNATURE_VERSION, "tasks": list(parts)}
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


# the image statistics (IMAGEMILL_IMAGE_QUALITY): a part of its own after the tasks' when on, and
# no part at all when off, so runs that do not ask for them keep their signatures
QUALITY = "quality"
QUALITY_OPTIONS: dict[str, Any] = {"version": QUALITY_VERSION}


def quality_part(options: Mapping[str, Any]) -> Part:
    return {"task": QUALITY, "model": "imagemill", "revision": None, "options": dict(options)}


def pipeline_signature(runners: Sequence[Runner], *, quality: bool = False) -> str:
    """The signature of the records these loaded runners make (with the image statistics, when on)."""
    parts = [task_part(r.task, r.model_id.name, r.model_id.revision, r.options()) for r in runners]
    if quality:
        parts.append(quality_part(QUALITY_OPTIONS))
    return signature_of(parts)


def record_parts(
    outputs: Mapping[Task, tuple[str, str | None]], options: Mapping[str, Mapping[str, Any]]
) -> list[Part]:
    """The parts of a stored record's signature, from what the record holds: each task's model and
    revision as its output names them, and its options as the record's `task_options` keeps them.
    KeyError when a task has no options there."""
    parts = [task_part(task, *outputs[task], options[task.value]) for task in TASKS if task in outputs]
    if QUALITY in options:
        parts.append(quality_part(options[QUALITY]))
    return parts


def retag_signature(signature: str, model: str, revision: str | None, options: dict[str, Any]) -> str:
    """The signature of re-tagged records whose own parts are unknown (written before records kept
    their tasks' options, or from a run whose parts do not hash to their signature): derived from
    the signature they had and the new tags' model and options. No run computes it, so the next run
    annotates them again; retagging again with the same options gives the same one."""
    spec = {
        "version": SIGNATURE_VERSION,
        "from": signature,
        "retag": {"task": "tags", "model": model, "revision": revision, "options": options},
    }
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]
