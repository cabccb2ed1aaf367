"""Configuration from the environment (prefix `IMAGEMILL_`), one pydantic-settings model.

Every tunable lives here so the CLI, the worker and the producer read the same names.
"""

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from imagemill.core.schemas import Task

DEFAULT_VOCABULARY = Path(__file__).parent / "data" / "tags.txt"


class Settings(BaseSettings):
    """All of imagemill's settings; each field `foo` is read from `IMAGEMILL_FOO`."""

    model_config = SettingsConfigDict(env_prefix="IMAGEMILL_", extra="ignore")

    # models: hub id or local directory
    caption_model: str = "Salesforce/blip-image-captioning-large"
    moderation_model: str = "Falconsai/nsfw_image_detection"
    tags_model: str = "openai/clip-vit-base-patch32"
    tags_vocabulary: Path = DEFAULT_VOCABULARY
    model_revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) for hub-id models."
    )

    # inference
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    batch_size: int = Field(default=64, ge=1, le=4096)
    torch_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for the models; default: torch's (every core)"
    )

    # outputs (these change records, so they enter the pipeline signature)
    caption_max_new_tokens: int = Field(default=30, ge=1, le=512)
    caption_num_beams: int = Field(default=1, ge=1, le=16)
    moderation_thresholds: dict[str, float] = {"nsfw": 0.5}
    tags_top_k: int = Field(default=5, ge=1, le=100)
    tags_threshold: float = Field(default=0.05, ge=0.0, le=1.0)
    tags_prompt: str = "a photo of {}."

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
    task_max_retries: int = Field(default=10, ge=0)
    worker_tasks: Annotated[tuple[Task, ...], NoDecode] = Field(
        default=tuple(Task), description="models a worker loads at start-up (others load on demand)"
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

    @field_validator("worker_tasks", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @property
    def registry_url(self) -> str:
        return self.redis_url or self.broker_url

    @cached_property
    def vocabulary(self) -> list[str]:
        """The tag vocabulary: one tag per line, blank lines and `#` comments ignored."""
        lines = self.tags_vocabulary.read_text(encoding="utf-8").splitlines()
        tags = [line.strip() for line in lines]
        return list(dict.fromkeys(t for t in tags if t and not t.startswith("#")))


def get_settings() -> Settings:
    """Settings read from the environment now (a new object each call, so tests can vary env)."""
    return Settings()
