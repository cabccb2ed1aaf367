"""The pipeline signature: a hash of everything that changes a record's outputs.

Tasks, model names and revisions, and output settings; part of every record's idempotency key.
"""

import hashlib
import json
from collections.abc import Sequence
from typing import Any

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


def retag_signature(signature: str, model: str, revision: str | None, options: dict[str, Any]) -> str:
    """The signature of records re-tagged from their stored embeddings: derived from the signature
    they had and the new tags' model and options, so each (old signature, vocabulary …) pair has its
    own and retagging again with the same options gives the same one."""
    spec = {
        "version": SIGNATURE_VERSION,
        "from": signature,
        "retag": {"task": "tags", "model": model, "revision": revision, "options": options},
    }
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]
