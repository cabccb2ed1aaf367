"""Log lines that say which job and chunk they belong to, as text or as one JSON object per line.

`log_context(job_id=..., chunk_id=...)` marks everything logged inside it (contextvars, so
threads and tasks each keep their own); `JsonFormatter` writes one JSON object per line;
`ContextFilter` puts the ids on every record so a text format may show them too.
"""

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

JOB_ID: ContextVar[str | None] = ContextVar("imagemill_job_id", default=None)
CHUNK_ID: ContextVar[str | None] = ContextVar("imagemill_chunk_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# attributes every LogRecord has; anything else on a record came from `extra=` and is logged too
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "job_id", "chunk_id"}


@contextmanager
def log_context(job_id: str | None = None, chunk_id: str | None = None) -> Iterator[None]:
    """Every line logged inside carries these ids (an unset one keeps the outer value)."""
    tokens = []
    if job_id is not None:
        tokens.append((JOB_ID, JOB_ID.set(job_id)))
    if chunk_id is not None:
        tokens.append((CHUNK_ID, CHUNK_ID.set(chunk_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            try:
                var.reset(token)
            except ValueError:  # reset from another context (a generator finished elsewhere)
                var.set(None)


class ContextFilter(logging.Filter):
    """Adds `job_id` and `chunk_id` (None when unset) to every record; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = JOB_ID.get()
        if getattr(record, "chunk_id", None) is None:
            record.chunk_id = CHUNK_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, job_id, chunk_id, pid, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None) or JOB_ID.get(),
            "chunk_id": getattr(record, "chunk_id", None) or CHUNK_ID.get(),
            "pid": record.process,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def as_json_line(text: str, stream: str, pid: int) -> str | None:
    """A line a process wrote, as a JSON log line: a JSON object as it is, anything else (Celery's
    `worker: Warm shutdown` printed past logging, a C library's message) wrapped as one; None for a blank line."""
    line = text.rstrip("\r\n")
    if not line.strip():
        return None
    try:
        if isinstance(json.loads(line), dict):
            return line
    except ValueError:
        pass
    entry = {
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": "ERROR" if stream == "stderr" else "INFO",
        "logger": stream,
        "message": line,
        "job_id": None,
        "chunk_id": None,
        "pid": pid,
    }
    return json.dumps(entry, ensure_ascii=False)


def apply(logger: logging.Logger, log_format: str) -> None:
    """Give every handler of `logger` the context filter and, for `json`, the JSON formatter
    (and Python warnings are JSON lines too)."""
    if log_format == "json":
        json_warnings()
    for handler in logger.handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
        if log_format == "json" and not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(JsonFormatter())


def configure(log_format: str, level: int = logging.INFO, text_format: str = TEXT_FORMAT) -> None:
    """Root logging to stderr for a command (`imagemill worker`'s supervisor), text or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(text_format))
    handler.addFilter(ContextFilter())
    logging.basicConfig(level=level, handlers=[handler])
    if log_format == "json":
        json_warnings()


def json_warnings() -> None:
    """Python warnings as JSON lines on stderr, from now on, even before logging is configured."""
    logging.captureWarnings(True)
    logger = logging.getLogger("py.warnings")
    if not any(isinstance(handler.formatter, JsonFormatter) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(ContextFilter())
        logger.addHandler(handler)
    logger.propagate = False
