"""imagemill: annotate images in bulk with captions, moderation scores and tags.

The package root owns the version and the Python API's lazy exports (`from imagemill import Annotator`).
"""

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["Annotator", "BatchAnnotator", "InlineImage", "__version__"]

# name -> module that defines it; imported on first use so `import imagemill` (every CLI command,
# the worker supervisor) stays free of numpy, Pillow and boto3, and never touches torch. Not even
# under TYPE_CHECKING: import-linter counts that as cli -> imagemill -> api, which the layers forbid;
# type-checked code that wants the classes' types imports them from imagemill.api.
LAZY_EXPORTS = {"Annotator": "imagemill.api", "BatchAnnotator": "imagemill.api", "InlineImage": "imagemill.api"}


def __getattr__(name: str) -> Any:
    module = LAZY_EXPORTS.get(name)
    if module is None:
        # AttributeError, exactly: `celery -A imagemill.worker` tries getattr(imagemill, "worker")
        # first and imports the submodule only when that raises AttributeError
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY_EXPORTS))
