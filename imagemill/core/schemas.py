"""The data that crosses boundaries: image references in, records out.

Pydantic models, validated on arrival; a record is defined here once for every sink.
"""

import base64
import binascii
from datetime import UTC, datetime
from typing import Any, ClassVar, Self

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
from imagemill.core.lanes import DEFAULT_LANE, Lane
from imagemill.core.tasks import TASK_FIELDS, Task


class ImageRef(BaseModel):
    """Where an image is, as listed: never its bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = Field(min_length=1, max_length=4096)
    etag: str | None = Field(default=None, max_length=256)
    size: int | None = Field(default=None, ge=0)
    # set for a bad manifest line (`uri` is then `manifest:<manifest uri>#L<n>`): why it names no image; it
    # travels like any ref, so its bad_reference record is made and counted where every record is
    problem: str | None = Field(default=None, max_length=1000)
    # when the object was created, for a ref an upload event announced (epoch seconds): the worker
    # measures upload-to-record from it
    event_time: float | None = Field(default=None, ge=0)

    @model_serializer(mode="wrap")
    def _problem_only_when_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # absent rather than null when unset: chunk messages stay what workers without the fields accept
        data: dict[str, Any] = handler(self)
        for name in ("problem", "event_time"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class ImageInfo(BaseModel):
    width: int
    height: int
    format: str | None


class ImageQuality(BaseModel):
    """Cheap statistics of the decoded picture (IMAGEMILL_IMAGE_QUALITY), as CleanVision reports
    them: brightness and contrast (mean and standard deviation of luma, 0-1), blur (variance of the
    Laplacian of luma, 0-255 scale: low is blurry), entropy (of luma's histogram, bits, 0-8), and
    low_information (a near-uniform picture: entropy below 2 bits)."""

    brightness: float
    contrast: float
    blur: float
    entropy: float
    low_information: bool


class DedupMark(BaseModel):
    """Where `imagemill dedup --write-back` put this image: its group, named by the representative's
    uri (None: no near-duplicate at `threshold`), and whether it is the one kept of its group (an
    image alone is its own). `--where duplicate` / `representative` read it."""

    group: str | None = None
    representative: bool
    threshold: float

    @property
    def duplicate(self) -> bool:
        """A member beside its group's representative: what `--where "not duplicate"` leaves out."""
        return not self.representative


class ModelOutput(BaseModel):
    """Fields every task's output carries: which model made it; and its flat columns in the dataset
    layout (`core.layout`: the Python API's adapters and `export --format hf`): `COLUMNS` names each
    with its type in `datasets` terms (a type name, a list of one type, or a struct), `columns()`
    gives this output's values."""

    model: str
    revision: str | None = None

    COLUMNS: ClassVar[dict[str, Any]] = {}

    def columns(self) -> dict[str, Any]:
        """One value per name of `COLUMNS`, in its order."""
        raise NotImplementedError


class Caption(ModelOutput):
    text: str
    # what the model was asked (a Florence-2 task token such as <CAPTION>); None for BLIP, which takes none
    prompt: str | None = None

    COLUMNS: ClassVar[dict[str, Any]] = {"caption": "string"}

    def columns(self) -> dict[str, Any]:
        return {"caption": self.text}


class Moderation(ModelOutput):
    flagged: bool
    scores: dict[str, float]

    COLUMNS: ClassVar[dict[str, Any]] = {
        "flagged": "bool",
        "moderation_scores": [{"label": "string", "score": "float32"}],
    }

    def columns(self) -> dict[str, Any]:
        scores = [{"label": label, "score": score} for label, score in self.scores.items()]
        return {"flagged": self.flagged, "moderation_scores": scores}


class TagScore(BaseModel):
    tag: str
    score: float


class Tags(ModelOutput):
    labels: list[TagScore]

    COLUMNS: ClassVar[dict[str, Any]] = {"tags": ["string"], "tag_scores": ["float32"]}

    def columns(self) -> dict[str, Any]:
        return {"tags": [t.tag for t in self.labels], "tag_scores": [t.score for t in self.labels]}


EMBEDDING_DTYPE = np.dtype("<f4")


class Embedding(ModelOutput):
    """The tags model's image embedding, L2-normalised: `dim` little-endian float32 values held as
    bytes (4 x dim), written to JSON as standard base64 (RFC 4648 with `+/`, not pydantic's
    URL-safe default, so `base64.b64decode` and numpy read it back as the README shows)."""

    dim: int = Field(gt=0)
    vector: bytes

    COLUMNS: ClassVar[dict[str, Any]] = {"embedding": ["float32"]}

    def columns(self) -> dict[str, Any]:
        return {"embedding": self.array()}

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
    # each task's options as the signature holds them (`{"tags": {"vocabulary": …, "top_k": 5, …}}`):
    # with the outputs' models and revisions they give the signature again, so retag can replace the
    # tags' part alone. None on records written before it was kept (and on `failed` ones)
    task_options: dict[str, dict[str, Any]] | None = None
    # probes' scores from the stored embedding (`imagemill score --head NAME=…`), by name; not part of
    # the signature: a score is added to a record, it does not change what the record's tasks made
    scores: dict[str, float] | None = None
    # the decoded picture's statistics, when IMAGEMILL_IMAGE_QUALITY asked for them
    quality: ImageQuality | None = None
    # dedup's group and role (`imagemill dedup --write-back`); not part of the signature either
    dedup: DedupMark | None = None

    @model_serializer(mode="wrap")
    def _only_asked_tasks(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # a task that was not asked for is absent, not null: readers can tell "not run" apart
        data: dict[str, Any] = handler(self)
        for name in (*TASK_FIELDS, *_ABSENT_WHEN_NONE):
            if data.get(name) is None:
                data.pop(name, None)
        return data

    @classmethod
    def failed(
        cls, ref: ImageRef, kind: ErrorKind, message: str, signature: str, job_id: str | None = None
    ) -> "Record":
        """The record of an image that was never annotated: its ref as listed and why (`worker_lost`
        for a chunk that killed its worker or engine process)."""
        return cls(
            uri=ref.uri,
            etag=ref.etag,
            bytes=ref.size,
            signature=signature,
            job_id=job_id,
            error=RecordError(kind=kind, message=message),
        )

    @property
    def outcome(self) -> str:
        """`annotated`, or the error kind: what counters and summaries count it as."""
        return self.error.kind.value if self.error else "annotated"

    @property
    def key(self) -> tuple[str, str | None, str]:
        """The idempotency key: writing the same key twice leaves one record."""
        return (self.uri, self.etag, self.signature)


# fields added after records were first written: absent rather than null when unset, so a record
# without them reads and writes as it did before
_ABSENT_WHEN_NONE = ("task_options", "scores", "quality", "dedup")

MAX_CHUNK_REFS = 10_000


class ChunkMessage(BaseModel):
    """What a chunk task carries through the broker: references only, never image bytes."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    chunk_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}/[0-9]{1,12}$")
    tasks: tuple[Task, ...] = Field(min_length=1, max_length=len(Task))
    refs: list[ImageRef] = Field(min_length=1, max_length=MAX_CHUNK_REFS)
    # the job's lane (its metrics' label; the broker orders deliveries by the message's priority)
    lane: Lane = DEFAULT_LANE
    # when the producer sent it (epoch seconds): the worker measures the queue wait from it
    enqueued_at: float | None = Field(default=None, ge=0)
