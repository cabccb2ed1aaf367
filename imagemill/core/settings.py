"""Configuration from the environment (prefix `IMAGEMILL_`), one pydantic-settings model.

Every tunable lives here so the CLI, the worker and the producer read the same names.
"""

import os
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic_settings
from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from imagemill.core.errors import UserError
from imagemill.core.schemas import Task

DEFAULT_VOCABULARY = Path(__file__).parent / "data" / "tags.txt"
ENV_PREFIX = "IMAGEMILL_"


class SettingsError(UserError):
    """One or more IMAGEMILL_* variables hold values imagemill cannot use; one line per variable."""


class _EnvSource(EnvSettingsSource):
    """The environment, with JSON that does not parse left as text for validation to report.

    pydantic-settings raises on the first undecodable JSON value (routes, thresholds) before
    validating anything; handing the text on lets every bad variable be named in one pass."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            return value


class Settings(BaseSettings):
    """All of imagemill's settings; each field `foo` is read from `IMAGEMILL_FOO`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # models: hub id or local directory
    caption_model: str = "Salesforce/blip-image-captioning-large"
    moderation_model: str = "Falconsai/nsfw_image_detection"
    tags_model: str = "openai/clip-vit-base-patch32"
    tags_vocabulary: Path = DEFAULT_VOCABULARY
    # one hub revision (branch, tag or commit; pin a commit) per model: the three are different repositories
    caption_revision: str | None = Field(default=None, description="hub revision of the caption model")
    moderation_revision: str | None = Field(default=None, description="hub revision of the moderation model")
    tags_revision: str | None = Field(default=None, description="hub revision of the tags model")
    model_revision: str | None = Field(
        default=None,
        description="deprecated: one revision for every model; used only where IMAGEMILL_<TASK>_REVISION is unset",
    )

    # inference
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    batch_size: int = Field(default=64, ge=1, le=4096)
    torch_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for the models; default: torch's (every core)"
    )
    decode_device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="where JPEGs are decoded: cuda (nvjpeg, on the models' GPU), cpu (Pillow), or auto: "
        "cuda when the models run on a GPU and torchvision's GPU decoder is there",
    )

    # outputs (these change records, so they enter the pipeline signature)
    caption_max_new_tokens: int = Field(default=30, ge=1, le=512)
    caption_num_beams: int = Field(default=1, ge=1, le=16)
    caption_prompt: str | None = Field(
        default=None,
        min_length=1,
        description="what the caption model is asked: a Florence-2 task token (<CAPTION>, <DETAILED_CAPTION>, "
        "<MORE_DETAILED_CAPTION>, <OCR>; default <CAPTION>), a chat VLM's question in words (default: "
        "Describe this image in one sentence.); BLIP takes none",
    )
    caption_compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="static KV cache and torch.compile for caption generation: auto = on a GPU for models "
        "transformers compiles whole; on = wherever the model allows (compiled on GPUs only); off = never",
    )
    moderation_thresholds: dict[str, float] = {"nsfw": 0.5}
    tags_top_k: int = Field(default=5, ge=1, le=100)
    tags_threshold: float = Field(default=0.05, ge=0.0, le=1.0)
    tags_prompt: str = "a photo of {}."
    embedding_dtype: Literal["float32", "float16"] = Field(
        default="float32", description="precision of stored embeddings (Parquet column, PostgreSQL, JSONL values)"
    )

    # input limits
    max_image_pixels: int = Field(default=64_000_000, ge=1)
    max_image_bytes: int = Field(default=64 * 1024 * 1024, ge=1)

    # pipeline concurrency
    fetch_threads: int = Field(default=16, ge=1, le=256)
    decode_threads: int = Field(default_factory=lambda: os.cpu_count() or 2, ge=1, le=256)

    # object storage; credentials come from boto3's usual chain (env, profile, role)
    s3_endpoint_url: str | None = None
    s3_max_attempts: int = Field(default=8, ge=1, le=50)

    # distributed mode
    broker_url: str = "redis://localhost:6379/0"
    redis_url: str | None = Field(default=None, description="Job registry; defaults to the broker")
    queue: str = "imagemill"
    routes: dict[str, str] = Field(
        default_factory=dict, description='task -> queue, e.g. {"caption": "imagemill-caption"}'
    )
    visibility_timeout: int = Field(default=3600, ge=1, description="seconds; above the longest chunk")
    soft_shutdown_timeout: float = Field(default=60.0, ge=0)
    chunk_size: int = Field(default=128, ge=1, le=10_000)
    queue_high_water: int = Field(default=200, ge=1, description="chunks queued before submit waits")
    task_max_retries: int = Field(
        default=15,
        ge=0,
        description="retries of a chunk after a transient fault; each pause random up to 2, 4, 8 … 120 s "
        "(15: about ten minutes in all)",
    )
    job_retention: int = Field(
        default=7 * 24 * 3600,
        ge=1,
        description="seconds a finished job (done, failed, cancelled) stays in Redis, then it expires",
    )
    worker_tasks: Annotated[tuple[Task, ...], NoDecode] = Field(
        default=tuple(Task), description="models a worker loads at start-up (others load on demand)"
    )
    worker_max_crashes: int = Field(
        default=5,
        ge=1,
        description="a worker process that exits this many times in a row, each within a minute of its start, "
        "makes `imagemill worker` exit non-zero instead of restarting it again",
    )
    worker_status_file: Path = Field(
        default=Path("/tmp/imagemill-worker.json"),
        description="where `imagemill worker` records its processes for `imagemill worker --check` (liveness)",
    )
    max_worker_losses: int = Field(
        default=2, ge=0, description="worker deaths a chunk may cause before it is dead-lettered"
    )
    sink: str | None = Field(default=None, description="Where workers write records")
    schedule_queue: str = "imagemill-schedules"
    beat_interval_s: float = Field(default=5.0, gt=0, description="how often beat looks for due scans")
    producer_stale_s: float = Field(
        default=30.0, gt=0, description="a producer silent this long may be taken over by a new submit"
    )

    # observability
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Prometheus metrics port of a worker process (off when unset); "
        "`imagemill worker` gives its N-th process this port + N",
    )
    metrics_addr: str = Field(default="0.0.0.0", description="address the metrics endpoint listens on")
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one JSON object per log line, with job and chunk ids"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _EnvSource(settings_cls), dotenv_settings, file_secret_settings

    @field_validator("worker_tasks", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device(value)

    @field_validator("routes")
    @classmethod
    def _known_tasks(cls, value: dict[str, str]) -> dict[str, str]:
        # a misspelt task would route nothing, silently: its jobs would go to the default queue
        unknown = sorted(set(value) - set(Task))
        if unknown:
            raise PydanticCustomError(
                "unknown_task",
                "unknown task {unknown}: expected {tasks}",
                {"unknown": ", ".join(unknown), "tasks": ", ".join(Task)},
            )
        return value

    def revision(self, task: Task) -> str | None:
        """The hub revision of `task`'s model: IMAGEMILL_<TASK>_REVISION, else the deprecated
        IMAGEMILL_MODEL_REVISION, else None (the default branch)."""
        own: str | None = {
            Task.CAPTION: self.caption_revision,
            Task.MODERATION: self.moderation_revision,
            Task.TAGS: self.tags_revision,
            Task.EMBEDDING: self.tags_revision,  # the embedding is the tags model's
        }[task]
        return own or self.model_revision

    @property
    def registry_url(self) -> str:
        return self.redis_url or self.broker_url

    @cached_property
    def vocabulary(self) -> list[str]:
        """The tag vocabulary: one tag per line, blank lines and `#` comments ignored."""
        lines = self.tags_vocabulary.read_text(encoding="utf-8").splitlines()
        tags = [line.strip() for line in lines]
        return list(dict.fromkeys(t for t in tags if t and not t.startswith("#")))


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(value: str) -> str:
    """`value` if it names a device imagemill runs on (IMAGEMILL_DEVICE, `--device`); else an error with the choices."""
    if not _DEVICE.fullmatch(value):
        raise PydanticCustomError("unknown_device", "expected {choices}", {"choices": DEVICE_CHOICES})
    return value


def get_settings() -> Settings:
    """Settings read from the environment now (a new object each call, so tests can vary env).

    Raises SettingsError naming every bad IMAGEMILL_* variable, one line each."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(describe_errors(exc.errors(), os.environ)) from None
    except pydantic_settings.SettingsError as exc:  # a source failed before validation
        raise SettingsError(str(exc)) from None


def describe_errors(errors: list[ErrorDetails], environ: Mapping[str, str]) -> str:
    """`IMAGEMILL_BATCH_SIZE='abc': expected an integer`, one line per variable, in field order."""
    by_field: dict[str, list[str]] = {}
    for error in errors:
        field, *inner = error["loc"]
        detail = _expected(error)
        if inner and isinstance(inner[-1], str):  # a key of a JSON object
            detail = f"{inner[-1]}: {detail}"
        elif inner:  # an item of a list
            detail = f"{error['input']!r}: {detail}"
        by_field.setdefault(str(field), []).append(detail)
    lines = []
    for field in sorted(by_field, key=_field_order):
        name = ENV_PREFIX + field.upper()
        # names are matched case-insensitively, so show the one actually set
        found = next(((key, value) for key, value in environ.items() if key.upper() == name), None)
        shown = f"{found[0]}={found[1]!r}" if found else name
        lines.append(f"{shown}: {'; '.join(dict.fromkeys(by_field[field]))}")
    return "\n".join(lines)


def _field_order(field: str) -> int:
    names = list(Settings.model_fields)
    return names.index(field) if field in names else len(names)


def _expected(error: ErrorDetails) -> str:
    """What the value should have been, in the words of the README's tables."""
    kind, ctx = error["type"], error.get("ctx") or {}
    words = {
        "int_parsing": "expected an integer",
        "int_type": "expected an integer",
        "int_from_float": "expected a whole number",
        "float_parsing": "expected a number",
        "float_type": "expected a number",
        "bool_parsing": "expected true or false",
        "dict_type": 'expected a JSON object, e.g. {"key": "value"}',
        "greater_than_equal": f"expected a number of at least {ctx.get('ge')}",
        "greater_than": f"expected a number above {ctx.get('gt')}",
        "less_than_equal": f"expected a number of at most {ctx.get('le')}",
        "less_than": f"expected a number below {ctx.get('lt')}",
        "literal_error": f"expected one of {ctx.get('expected')}",
        "enum": f"expected one of {ctx.get('expected')}",
    }
    if kind in words:
        return words[kind]
    message = error["msg"]
    if message.startswith("Input should be "):
        return "expected " + message.removeprefix("Input should be ")
    return message[:1].lower() + message[1:]
