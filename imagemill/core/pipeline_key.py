"""What a pipeline is called before its models load: the tasks and the configured models.

Workers publish the signature their loaded models give under this key; producers look it up.
"""

import hashlib
import json

from imagemill.core.settings import Settings
from imagemill.core.tasks import Task


def pipeline_key(tasks: tuple[Task, ...], settings: Settings) -> str:
    spec = {
        "tasks": list(tasks),
        "models": [settings.model(task) for task in tasks],
        "revision": settings.model_revision,
    }
    own = {task.value: settings.revision(task) for task in tasks if settings.revision(task) != settings.model_revision}
    if own:  # per-model revisions (the key is unchanged where only the deprecated one is set)
        spec["revisions"] = own
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]
