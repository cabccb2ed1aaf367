"""The Python API: `Annotator` runs the engine on paths, URIs, bytes and pictures, one record each;
`submit` enqueues a distributed job in a lane, as `imagemill submit` does.

It also owns the thin adapters to dataset libraries: `datasets.Dataset.map` and Ray Data `map_batches`.
"""

import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image

from imagemill.core import layout
from imagemill.core.images import is_s3
from imagemill.core.lanes import DEFAULT_LANE, Lane, parse_lane
from imagemill.core.schemas import ImageRef, Record
from imagemill.core.settings import Settings, get_settings
from imagemill.core.tasks import DEFAULT_TASKS, Task, parse_tasks
from imagemill.pipeline.prepare.prefetch import InlineImage
from imagemill.pipeline.sources import local_ref

if TYPE_CHECKING:
    from imagemill.pipeline.engine import Engine

__all__ = [
    "Annotator",
    "BatchAnnotator",
    "DatasetsMapper",
    "ImageItem",
    "InlineImage",
    "Lane",
    "record_columns",
    "record_features",
    "submit",
]

# what `Annotator.annotate` takes
ImageItem: TypeAlias = (
    str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | npt.NDArray[Any] | ImageRef | InlineImage
)
ITEM_TYPES = (
    "give a path, a file:// or s3:// URI, encoded bytes, a PIL image, an HxW or HxWxC array, "
    "an ImageRef or an InlineImage"
)

ALL_TASKS: tuple[Task, ...] = DEFAULT_TASKS
URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
SINGLE_ITEMS = (str, bytes, bytearray, memoryview, os.PathLike, Image.Image, np.ndarray)


class Annotator:
    """The models for `tasks`, loaded once; `annotate` turns images into records, in their order.

    Settings come from the environment (`IMAGEMILL_*`, as for the CLI) or `settings`, and any
    `Settings` field given as a keyword overrides them: `Annotator(batch_size=8, device="cpu")`.
    One `annotate` at a time per Annotator: the models and the prefetch threads are shared.
    """

    def __init__(
        self, tasks: str | Iterable[str] = ALL_TASKS, *, settings: Settings | None = None, **overrides: Any
    ) -> None:
        self.tasks: tuple[Task, ...] = parse_tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
        self.settings: Settings = with_overrides(settings if settings is not None else get_settings(), overrides)
        # here, not at the top: the engine brings torch and transformers, which importing the API must not
        from imagemill.pipeline.engine import Engine

        self._engine: Engine | None = Engine(self.settings, self.tasks)

    @property
    def signature(self) -> str:
        """The pipeline signature every record of this Annotator carries (tasks, models, settings)."""
        return self._open_engine().signature

    def annotate(self, items: Iterable[ImageItem]) -> Iterator[Record]:
        """One `Record` per item, in the items' order, lazily; a bad image is an error record.

        Record uris: a path's is its absolute `file://` URI (as in local mode), a URI is kept as
        given, bytes are `bytes:sha256:<first 16 hex digits>` (etag: the whole digest), a PIL image
        is `pil:<index>` and an array `array:<index>` (its position in `items`). For ids of your own,
        pass `InlineImage(uri=..., data=...)`. An item of another type raises TypeError.
        """
        if isinstance(items, SINGLE_ITEMS):
            # a lone path would otherwise be iterated character by character
            raise TypeError(f"annotate takes an iterable of images, not one {type(items).__name__}; wrap it: [item]")
        return self._open_engine().annotate(as_item(item, index) for index, item in enumerate(items))

    def for_datasets(self, image_column: str = "image") -> "DatasetsMapper":
        """A function for `datasets.Dataset.map(batched=True)` that adds result columns (see `record_columns`)."""
        return DatasetsMapper(self, image_column)

    def close(self) -> None:
        """Stop the prefetch threads and let the models go; `annotate` refuses afterwards."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> "Annotator":
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _open_engine(self) -> "Engine":
        if self._engine is None:
            raise RuntimeError("this Annotator is closed")
        return self._engine


def submit(
    source: str,
    sink: str | None = None,
    tasks: str | Iterable[str] = ALL_TASKS,
    *,
    priority: Lane | str = DEFAULT_LANE,
    share: int = 1,
    force: bool = False,
    settings: Settings | None = None,
) -> str:
    """Enqueue a distributed job as `imagemill submit SOURCE` does, in the lane `priority` (urgent,
    normal or backfill) with the weight `share` among its lane's jobs; returns the job's id once its
    chunks are all enqueued (under backpressure: this waits while the lane is full). Submitting a
    running job's source, sink and pipeline again attaches to it (it keeps its lane). `sink` defaults
    to IMAGEMILL_SINK; a fault the caller can fix raises `imagemill.core.errors.UserError`."""
    # here, not at the top: celery, redis, boto3 and the sinks' drivers load when a job is submitted
    from imagemill.core.errors import UserError
    from imagemill.core.jobs import JobRegistry
    from imagemill.producer.submit import Submission, checked_source

    chosen = settings if settings is not None else get_settings()
    target = sink or chosen.sink
    if not target:
        raise UserError("no sink: pass sink='postgresql://…' or s3://bucket/prefix/, or set IMAGEMILL_SINK")
    lane = priority if isinstance(priority, Lane) else parse_lane(priority)
    parsed = parse_tasks(tasks if isinstance(tasks, str) else ",".join(tasks))
    opened = checked_source(source, target, chosen)
    with (
        JobRegistry(chosen.registry_url) as registry,
        Submission(opened, parsed, target, chosen, registry, force=force, lane=lane, share=share) as submission,
    ):
        registry.check()
        job, _created = submission.register()
        submission.run()
    return job.id


def with_overrides(settings: Settings, overrides: Mapping[str, Any]) -> Settings:
    """`settings` with `overrides` applied and validated; an unknown name raises TypeError."""
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:
        raise TypeError(
            f"unknown setting {', '.join(unknown)}: overrides are fields of imagemill.core.settings.Settings"
        )
    if not overrides:
        return settings
    # validated (model_copy would accept batch_size=-1), and without re-reading the environment
    return Settings.model_validate({**settings.model_dump(), **overrides})


def as_item(value: ImageItem, index: int) -> ImageRef | InlineImage:
    """One thing the caller gave -> what the engine takes; `index` names unnamed pictures."""
    if isinstance(value, ImageRef | InlineImage):
        return value
    if isinstance(value, Image.Image):
        return InlineImage(uri=f"pil:{index}", data=value)
    if isinstance(value, np.ndarray):
        return InlineImage(uri=f"array:{index}", data=array_picture(value))
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        # hashed here, once: the uri names the content, so the same bytes get the same record key
        digest = hashlib.sha256(data).hexdigest()
        return InlineImage(uri=f"bytes:sha256:{digest[:16]}", data=data, etag=digest)
    if isinstance(value, str) and (is_s3(value) or value.startswith("file://")):
        return ImageRef(uri=value)
    if isinstance(value, str) and URI_SCHEME.match(value):
        raise ValueError(f"cannot read {value}: {ITEM_TYPES}")
    if isinstance(value, str | os.PathLike):
        # like a folder's files: an absolute file:// uri with the file's etag and size
        return local_ref(Path(os.fspath(value)).expanduser())
    raise TypeError(f"cannot annotate a {type(value).__name__}: {ITEM_TYPES}")


def array_picture(array: npt.NDArray[Any]) -> Image.Image:
    """An HxW or HxWxC array (Ray's image columns) -> a PIL picture; TypeError if it is none."""
    try:
        return Image.fromarray(array)
    except (TypeError, ValueError) as exc:
        # the array's dtype or shape is the caller's mistake, not a bad image: say so at once
        raise TypeError(f"cannot use a {array.dtype} array of shape {array.shape} as a picture: {exc}") from None


# ---- adapters: flat columns a dataset team can filter and join on ----


def record_columns(records: Sequence[Record], tasks: Sequence[Task]) -> dict[str, list[Any]]:
    """Records -> columns, one value per record, in the layout `export --format hf` writes too
    (`core.layout`, the README's "Dataset columns"): a task's columns only if it was asked for:
    caption (str), flagged (bool), moderation_scores ([{label, score}]), tags ([str]), tag_scores
    ([float32], the tags' scores in the same order), embedding (float32 list, unit norm); then
    error_kind and error_message (str). A failed image has None in every task column, so "no tags
    above the threshold" ([]) stays apart from "not annotated" (None).
    """
    return layout.columns_of(records, layout.api_columns(tasks))


def column_item(value: Any) -> Any:
    """A dataset cell -> an `annotate` item; a Hugging Face Image cell stored undecoded is a dict."""
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        return value.get("bytes") or value.get("path")
    return value


class DatasetsMapper:
    """For `datasets.Dataset.map(batched=True)`: a batch in, the result columns out (datasets adds them).

    Pass `features=mapper.features(ds.features)` to `map`: a column that is None in a whole first
    batch (error_kind, usually) is otherwise typed null and cannot take values later.
    """

    def __init__(self, annotator: Annotator, image_column: str) -> None:
        self.annotator = annotator
        self.image_column = image_column

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
        items = [column_item(value) for value in batch[self.image_column]]
        return record_columns(list(self.annotator.annotate(items)), self.annotator.tasks)

    def features(self, existing: Mapping[str, Any] | None = None) -> Any:
        """`datasets.Features`: `existing` (the dataset's own) plus the result columns' types."""
        return record_features(self.annotator.tasks, existing)


def record_features(tasks: Sequence[Task], existing: Mapping[str, Any] | None = None) -> Any:
    """The `datasets.Features` of `record_columns(records, tasks)`, after `existing` (a dataset's own)."""
    added = layout.features(layout.api_columns(tasks))
    return type(added)({**(existing or {}), **added})  # datasets.Features, a dict


class ColumnFrame(Protocol):
    """A pandas DataFrame as Ray's batch_format="pandas" passes it, without importing pandas."""

    @property
    def columns(self) -> Iterable[Any]: ...

    def __getitem__(self, name: str) -> Any: ...


class BatchAnnotator:
    """A callable class for Ray Data `map_batches`: one Annotator per actor, loaded once.

    Takes a batch as a dict of columns (Ray's "numpy" format; a pandas DataFrame also works) and
    returns it as a dict of arrays with the `record_columns` added. `image_column` holds, per row,
    anything `annotate` takes: paths or URIs, encoded bytes, or decoded HxWxC arrays.
    """

    def __init__(
        self,
        tasks: str | Iterable[str] = ALL_TASKS,
        *,
        image_column: str = "image",
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        self.annotator = Annotator(tasks, settings=settings, **overrides)
        self.image_column = image_column

    def __call__(self, batch: Mapping[str, Any] | ColumnFrame) -> dict[str, Any]:
        columns = dict(batch) if isinstance(batch, Mapping) else {str(n): batch[n].to_numpy() for n in batch.columns}
        # a column of equal-sized images arrives as one N x H x W x C array: iterating yields its rows
        items = [column_item(value) for value in columns[self.image_column]]
        results = record_columns(list(self.annotator.annotate(items)), self.annotator.tasks)
        return {**columns, **{name: object_array(values) for name, values in results.items()}}

    def close(self) -> None:
        self.annotator.close()


def object_array(values: list[Any]) -> npt.NDArray[np.object_]:
    """A 1-D object array, one cell per value: np.array would turn equal-length lists into a 2-D array."""
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        array[i] = value
    return array
