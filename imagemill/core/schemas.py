"""The data that crosses boundaries: image references in, records out.

Pydantic models, validated on arrival; a record is defined here once for every writer.
"""

import base64
import binascii
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Self

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from imagemill.core.errors import ErrorKind


class Task(StrEnum):
    """What can be asked of a pipeline; the order here is the order they run in."""

    CAPTION = "caption"
    MODERATION = "moderation"
    TAGS = "tags"
    EMBEDDING = "embedding"


# what runs when no tasks are named: the embedding (kilobytes per record) is asked for by name
DEFAULT_TASKS = (Task.CAPTION, Task.MODERATION, Task.TAGS)


def parse_tasks(text: str) -> tuple[Task, ...]:
    """`"caption,tags"` -> tasks in canonical order; raises ValueError naming an unknown task."""
    names = {part.strip().lower() for part in text.split(",") if part.strip()}
    if not names:
        raise ValueError("no tasks given; choose from " + ", ".join(t.value for t in Task))
    unknown = names - {t.value for t in Task}
    if unknown:
        known = ", ".join(t.value for t in Task)
        raise ValueError(f"unknown task {', '.join(sorted(unknown))}; choose from {known}")
    return tuple(t for t in Task if t.value in names)


class ImageRef(BaseModel):
    """Where an image is, as listed: never its bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = Field(min_length=1, max_length=4096)
    etag: str | None = Field(default=None, max_length=256)
    size: int | None = Field(default=None, ge=0)
    # set for a bad manifest line (`uri` is then `manifest:<name>#L<n>`): why it names no image; it
    # travels like any ref, so its bad_reference record is made and counted where every record is
    problem: str | None = Field(default=None, max_length=1000)

    @model_serializer(mode="wrap")
    def _problem_only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # absent rather than null on a good ref: chunk messages stay what workers without the field accept
        data: dict[str, Any] = handler(self)
        if data.get("problem") is None:
            data.pop("problem", None)
        return data


class ImageInfo(BaseModel):
    width: int
    height: int
    format: str | None


class ModelOutput(BaseModel):
    """Fields every task's output carries: which model made it."""

    model: str
    revision: str | None = None


class Caption(ModelOutput):
    text: str
    # what the model was asked (a Florence-2 task token such as <CAPTION>); None for BLIP, which takes none
    prompt: str | None = None


class Moderation(ModelOutput):
    flagged: bool
    scores: dict[str, float]


class TagScore(BaseModel):
    tag: str
    score: float


class Tags(ModelOutput):
    labels: list[TagScore]


EMBEDDING_DTYPE = np.dtype("<f4")


class Embedding(ModelOutput):
    """The tags model's image embedding, L2-normalised: `dim` little-endian float32 values held as
    bytes (4 x dim), written to JSON as standard base64 (RFC 4648 with `+/`, not pydantic's
    URL-safe default, so `base64.b64decode` and numpy read it back as the README shows)."""

    dim: int = Field(gt=0)
    vector: bytes

    @field_validator("vector", mode="before")
    @classmethod
    def _as_bytes(cls, value: object) -> object:
        if isinstance(value, str):  # JSON: base64 (URL-safe spelling accepted too)
            try:
                return base64.b64decode(value.translate(_URLSAFE), validate=True)
            except binascii.Error as exc:
                raise ValueError(f"embedding vector is not base64: {exc}") from exc
        if isinstance(value, (list, tuple, np.ndarray)):  # e.g. a Parquet or real[] column of floats
            return np.asarray(value, dtype=EMBEDDING_DTYPE).tobytes()
        return value

    @model_validator(mode="after")
    def _length_matches_dim(self) -> Self:
        if len(self.vector) != EMBEDDING_DTYPE.itemsize * self.dim:
            raise ValueError(f"embedding vector has {len(self.vector)} bytes; dim {self.dim} needs {4 * self.dim}")
        return self

    @field_serializer("vector", when_used="json")
    def _base64(self, vector: bytes) -> str:
        return base64.b64encode(vector).decode("ascii")

    def array(self) -> npt.NDArray[np.float32]:
        """The vector as a read-only float32 array of shape (dim,), a view of `vector` (no copy)."""
        return np.frombuffer(self.vector, dtype=EMBEDDING_DTYPE)

    @classmethod
    def of(cls, array: npt.ArrayLike, *, model: str, revision: str | None = None) -> "Embedding":
        """An embedding from any 1-d array of numbers, stored as little-endian float32."""
        values = np.asarray(array, dtype=EMBEDDING_DTYPE).reshape(-1)
        return cls(model=model, revision=revision, dim=values.size, vector=values.tobytes())


_URLSAFE = str.maketrans("-_", "+/")


class RecordError(BaseModel):
    kind: ErrorKind
    message: str


class Timings(BaseModel):
    """Milliseconds spent on this image per stage (inference is its share of the batch)."""

    fetch_ms: float = 0.0
    decode_ms: float = 0.0
    infer_ms: float = 0.0


TASK_FIELDS = tuple(t.value for t in Task)


class Record(BaseModel):
    """One image's annotation (or its error) under one pipeline signature."""

    uri: str
    etag: str | None = None
    bytes: int | None = None
    image: ImageInfo | None = None
    caption: Caption | None = None
    moderation: Moderation | None = None
    tags: Tags | None = None
    embedding: Embedding | None = None
    error: RecordError | None = None
    signature: str
    job_id: str | None = None
    timings: Timings = Field(default_factory=Timings)
    processed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @model_serializer(mode="wrap")
    def _only_asked_tasks(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a task that was not asked for is absent, not null: readers can tell "not run" apart
        data: dict[str, Any] = handler(self)
        for name in TASK_FIELDS:
            if data.get(name) is None:
                data.pop(name, None)
        return data

    @property
    def outcome(self) -> str:
        """`annotated`, or the error kind: what counters and summaries count it as."""
        return self.error.kind.value if self.error else "annotated"

    @property
    def key(self) -> tuple[str, str | None, str]:
        """The idempotency key: writing the same key twice leaves one record."""
        return (self.uri, self.etag, self.signature)


MAX_CHUNK_REFS = 10_000


class ChunkMessage(BaseModel):
    """What a chunk task carries through the broker: references only, never image bytes."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    chunk_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}/[0-9]{1,12}$")
    tasks: tuple[Task, ...] = Field(min_length=1, max_length=len(Task))
    refs: list[ImageRef] = Field(min_length=1, max_length=MAX_CHUNK_REFS)
