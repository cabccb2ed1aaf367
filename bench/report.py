"""Where every benchmark's report goes: `save_results` writes `<UTC stamp>-<name>.json` and `.md` into
a folder (`bench/results/` by default); the JSON keeps the figures, the Markdown is what people read."""

import json
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def save_results(out: Path, name: str, result: Any, text: str, when: datetime | None = None) -> Path:
    """`result` as `<stamp>-<name>.json` and `text` as `<stamp>-<name>.md` in `out` (made if missing), the
    stamp being `when` (default now) in UTC; returns the Markdown's path."""
    stem = out / f"{(when or datetime.now(UTC)).astimezone(UTC):%Y%m%d-%H%M%S}-{name}"
    out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(text, encoding="utf-8")
    return stem.with_suffix(".md")


def _jsonable(value: Any) -> Any:
    """Dataclasses as their fields, anything else JSON cannot hold (paths, enums) as text."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return str(value)
