"""Configuration from the environment (prefix `IMAGEMILL_`), one pydantic-settings model.

Every tunable lives here so the CLI, the worker and the producer read the same names.
"""

import os
import re
import sys
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pydantic_settings
from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from imagemill.core.allowlists import sink_prefix, source_prefix
from imagemill.core.errors import UserError
from imagemill.core.redaction import redact_url
from imagemill.core.tasks import TASKS, Task

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

    image_quality: bool = Field(
        default=False,
        description="add each image's brightness, contrast, blur and entropy to its record (measured on the "
        "picture decoded for the models; part of the signature when on)",
    )

    # input limits
    max_image_pixels: int = Field(default=64_000_000, ge=1)
    max_image_bytes: int = Field(default=64 * 1024 * 1024, ge=1)

    # pipeline concurrency
    fetch_threads: int = Field(default=16, ge=1, le=256)
    decode_threads: int = Field(default_factory=lambda: os.cpu_count() or 2, ge=1, le=256)
    retag_processes: int = Field(
        default_factory=lambda: os.cpu_count() or 2,
        ge=1,
        le=256,
        description="processes a large retag to JSONL is split over (from JSONL or PostgreSQL)",
    )

    # object storage; credentials come from boto3's usual chain (env, profile, role)
    s3_endpoint_url: str | None = Field(default=None, description="http(s)://host[:port] of an S3 protocol server")
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
    worker_status_file: Path | None = Field(
        default=None,
        description="where `imagemill worker` records its processes for `imagemill worker --check` (liveness); "
        "unset: a file of its own in the temporary directory, named by host and pid, and `--check` checks "
        "every running worker's",
    )
    max_worker_losses: int = Field(
        default=2, ge=0, description="worker deaths a chunk may cause before it is dead-lettered"
    )
    sink: str | None = Field(default=None, description="Where workers write records")
    # A message on the broker names the images to read and, through its job, the sink to write: these
    # bound both for distributed workers (imagemill.core.allowlists); local mode does not read them
    allowed_sources: Annotated[tuple[str, ...] | None, NoDecode] = Field(
        default=None,
        description="URI prefixes workers may read images from, comma-separated: s3://bucket/prefix/, "
        "file:///dir/; unset: any s3:// object, no local path",
    )
    allowed_sinks: Annotated[tuple[str, ...] | None, NoDecode] = Field(
        default=None,
        description="URI prefixes workers may write records to, comma-separated: postgresql://host/db, "
        "s3://bucket/prefix/, s3tags://bucket/, file:///dir/; unset: any database or bucket, no local path",
    )
    schedule_queue: str = "imagemill-schedules"
    beat_interval_s: float = Field(default=5.0, gt=0, description="how often beat looks for due scans")
    beat_lock_timeout_s: float = Field(
        default=30.0,
        ge=1,
        description="a beat that has not renewed its lock this long (at least 5 beat intervals) loses it"
        " to a waiting one",
    )
    producer_stale_s: float = Field(
        default=30.0, gt=0, description="a producer silent this long may be taken over by a new submit"
    )

    # upload events (`imagemill watch`)
    watch_secret: SecretStr | None = Field(
        default=None,
        description="the shared secret an S3 server's webhook sends (Bearer token or ?token=); "
        "the HTTP receiver refuses to start without one",
    )
    watch_batch_s: float = Field(
        default=1.0, gt=0, le=60, description="seconds a watcher goes on gathering waiting events into a chunk at most"
    )
    watch_batch_images: int = Field(default=32, ge=1, le=1000, description="images per watch chunk at most")
    watch_visibility_timeout: int = Field(
        default=120,
        ge=5,
        le=43200,
        description="seconds an SQS message stays hidden from other watchers while its batch is enqueued; "
        "a watcher that dies leaves it to reappear after this",
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
    accounting: bool = Field(
        default=True,
        description="per-image accounting (stage seconds, busy share, starvation); off only to measure its cost",
    )

    # money and estimates
    cost_per_hour: float | None = Field(
        default=None,
        ge=0,
        description="what one worker process (one GPU: the worker runs one process per GPU) or one local "
        "engine process costs per hour; jobs show their cost and budgets stop them",
    )
    rates_file: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "imagemill" / "rates.jsonl",
        description="where local runs keep the rates they measured per pipeline, for `imagemill estimate`",
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

    @field_validator("worker_tasks", "allowed_sources", "allowed_sinks", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device(value)

    @field_validator("redis_url", "s3_endpoint_url", "watch_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `IMAGEMILL_REDIS_URL=` (a template's blank) has always meant the default: keep it so
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("watch_secret")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_LENGTH:
            raise PydanticCustomError("short_secret", "expected at least {n} characters", {"n": MIN_SECRET_LENGTH})
        return value

    @field_validator("broker_url", "redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        return None if value is None else check_redis_url(value)

    @field_validator("s3_endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else check_http_url(value)

    @field_validator("allowed_sources", "allowed_sinks")
    @classmethod
    def _prefixes(cls, value: tuple[str, ...] | None, info: ValidationInfo) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise PydanticCustomError("no_prefix", "expected at least one URI prefix; unset it for the default")
        parse = source_prefix if info.field_name == "allowed_sources" else sink_prefix
        for entry in value:
            try:
                parse(entry)
            except ValueError as exc:
                raise PydanticCustomError(
                    "bad_prefix", "{entry}: {reason}", {"entry": redact_url(entry), "reason": str(exc)}
                ) from None
        return value

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
        own: str | None = getattr(self, TASKS[task].revision_setting)
        return own or self.model_revision

    def model(self, task: Task) -> str:
        """The model of `task` (hub id or directory): IMAGEMILL_<…>_MODEL as the task table names it."""
        name: str = getattr(self, TASKS[task].model_setting)
        return name

    @property
    def registry_url(self) -> str:
        return self.redis_url or self.broker_url

    @cached_property
    def vocabulary(self) -> list[str]:
        """The tag vocabulary: one tag per line, blank lines and `#` comments ignored."""
        lines = self.tags_vocabulary.read_text(encoding="utf-8").splitlines()
        tags = [line.strip() for line in lines]
        return list(dict.fromkeys(t for t in tags if t and not t.startswith("#")))


REDIS_URL_FORM = "redis://[:password@]host[:port][/db] or rediss://… (TLS)"
HTTP_URL_FORM = "http://host[:port] or https://host[:port]"
# settings whose values may hold a password: an error shows them redacted
_SECRET_FIELDS = frozenset({"broker_url", "redis_url", "sink", "s3_endpoint_url", "allowed_sinks"})
# settings that are a secret: an error names the variable, never its value
_HIDDEN_FIELDS = frozenset({"watch_secret"})
MIN_SECRET_LENGTH = 16


def check_redis_url(value: str) -> str:
    """`value` if Celery's Redis transport and redis-py can both use it (a scheme they take, a host, a
    numeric port and database); else an error naming the form. Nothing is ever tried with a bad one:
    Celery would quietly fall back to amqp://guest@localhost."""
    problem = _url_problem(value, ("redis", "rediss"))
    if problem is None:
        database = urlsplit(value).path.strip("/")
        if database and not database.isdigit():
            problem = f"the database {database!r} is not a number"
    if problem is not None:
        raise PydanticCustomError(
            "redis_url", "{problem}: expected {form}", {"problem": problem, "form": REDIS_URL_FORM}
        )
    return value


def check_http_url(value: str) -> str:
    """`value` if it is an http(s) URL with a host (an S3 endpoint); else an error naming the form."""
    problem = _url_problem(value, ("http", "https"))
    if problem is not None:
        raise PydanticCustomError("http_url", "{problem}: expected {form}", {"problem": problem, "form": HTTP_URL_FORM})
    return value


def _url_problem(value: str, schemes: tuple[str, ...]) -> str | None:
    """What keeps `value` from being a URL of one of `schemes` with a host (and a numeric port), or None."""
    if "://" not in value:
        return "not a URL"
    try:
        parts = urlsplit(value)
        _ = parts.port  # a port that is not a number raises here
    except ValueError:
        return "not a URL (its host or port)"
    if parts.scheme.lower() not in schemes:
        return f"the scheme {parts.scheme or '(none)'!r} is not supported"
    if not parts.hostname:
        return "no host"
    return None


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
        raise SettingsError(describe_errors(exc.errors(), os.environ, secret=_HIDDEN_FIELDS)) from None
    except pydantic_settings.SettingsError as exc:  # a source failed before validation
        raise SettingsError(str(exc)) from None


def settings_or_exit() -> Settings:
    """The settings, for a Celery app module (`celery -A imagemill.worker`, `-A imagemill.producer`),
    where no CLI reports faults: a bad variable is one `error:` line each on stderr and exit 2, as the
    CLI says it, instead of Celery's "Unable to load celery application" traceback."""
    try:
        return get_settings()
    except SettingsError as exc:
        sys.stderr.write("".join(f"error: {line}\n" for line in str(exc).splitlines()))
        raise SystemExit(2) from None


def describe_errors(
    errors: list[ErrorDetails],
    environ: Mapping[str, str],
    prefix: str = ENV_PREFIX,
    model: type[BaseSettings] = Settings,
    secret: frozenset[str] = frozenset(),
) -> str:
    """`IMAGEMILL_BATCH_SIZE='abc': expected an integer`, one line per variable, in `model`'s field
    order. Values that may hold a password are shown redacted; those of `secret` fields not at all."""
    by_field: dict[str, list[str]] = {}
    for error in errors:
        field, *inner = error["loc"]
        detail = _expected(error)
        if inner and isinstance(inner[-1], str):  # a key of a JSON object
            detail = f"{inner[-1]}: {detail}"
        elif inner:  # an item of a list
            detail = f"{error['input']!r}: {detail}"
        by_field.setdefault(str(field), []).append(detail)
    names = list(model.model_fields)
    lines = []
    for field in sorted(by_field, key=lambda f: names.index(f) if f in names else len(names)):
        name = prefix + field.upper()
        # names are matched case-insensitively, so show the one actually set
        found = next(((key, value) for key, value in environ.items() if key.upper() == name), None)
        if found and field not in secret:
            shown = f"{found[0]}={_shown(field, found[1])!r}"
        else:
            shown = found[0] if found else name
        lines.append(f"{shown}: {'; '.join(dict.fromkeys(by_field[field]))}")
    return "\n".join(lines)


def _shown(field: str, value: str) -> str:
    """The value as an error may quote it: without a password, even in a URL too malformed to parse."""
    if field not in _SECRET_FIELDS:
        return value
    redacted = redact_url(value)
    if redacted == value and "@" in value:  # `redis//:pw@host`: whatever comes before the host may be one
        return "***@" + value.rpartition("@")[2]
    return redacted


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
