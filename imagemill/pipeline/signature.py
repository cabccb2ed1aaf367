"""The pipeline signature: a hash of everything that changes a record's outputs.

Tasks, model names and revisions, and output settings; part of every record's idempotency key.
"""

import hashlib
import json
from collections.abc import Sequence

from imagemill.pipeline.models.runner import Runner

SIGNATURE_VERSION = 1  # bump when the record's meaning changes for the same models


def pipeline_signature(runners: Sequence[Runner]) -> str:
    spec = {
        "version": SIGNATURE_VERSION,
        "tasks": [
            {
                "task": runner.task.value,
                "model": runner.model_id.name,
                "revision": runner.model_id.revision,
                "options": runner.options(),
            }
            for runner in runners
        ],
    }
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]
