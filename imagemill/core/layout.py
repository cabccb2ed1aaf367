"""The record-to-columns layout: how one record becomes one row of flat, typed columns, the same for
`export --format hf` and the Python API's dataset adapters (`Annotator.for_datasets`, `BatchAnnotator`).

Every column is a plain Arrow type a training run reads without a schema of its own: strings,
numbers, lists of one type, and lists of `{name, score}` pairs where the names vary with the model
(moderation labels, probes), never a struct whose fields change from one dataset to the next. The
task columns come from each output type's `COLUMNS` (`core.schemas`); this module adds the rest.
Export's earlier layout (`LEGACY`) is kept, deprecated, for one release.
"""

import importlib
from collections.abc import Iterable, Sequence
from typing import Any

from imagemill.core.schemas import Record
from imagemill.core.tasks import TASKS, Task

LAYOUT = "v2"  # this layout's name: export --layout, the README's table
LEGACY = "v1"  # export's layout before v2: tags [{tag, score}], scores {label: float}, error (its kind)

# a column's type in `datasets` terms: a type name, [one type] for a list, {name: type} for a struct
Spec = Any

# the record's own columns (export only: the API's rows are the caller's own images)
RECORD_COLUMNS: dict[str, Spec] = {
    "uri": "string",
    "etag": "string",
    "bytes": "int64",
    "width": "int32",
    "height": "int32",
    "format": "string",
}
ERROR_COLUMNS: dict[str, Spec] = {"error_kind": "string", "error_message": "string"}
# the image statistics (IMAGEMILL_IMAGE_QUALITY): a fixed struct, null where they were not asked for
QUALITY_COLUMNS: dict[str, Spec] = {
    "quality": {
        "brightness": "float32",
        "contrast": "float32",
        "blur": "float32",
        "entropy": "float32",
        "low_information": "bool",
    }
}
# probes' scores (`imagemill score --head NAME=…`), in the moderation scores' shape
PROBE_COLUMNS: dict[str, Spec] = {"probe_scores": [{"name": "string", "score": "float32"}]}
PROVENANCE_COLUMNS: dict[str, Spec] = {
    "signature": "string",
    "job_id": "string",
    "processed_at": "timestamp[us, tz=UTC]",
}


def task_columns(tasks: Iterable[Task]) -> dict[str, Spec]:
    """The columns of `tasks`, in the task table's order, each as its output type names it."""
    wanted = set(tasks)
    columns: dict[str, Spec] = {}
    for task, spec in TASKS.items():
        if task in wanted:
            columns |= spec.output_type().COLUMNS
    return columns


def api_columns(tasks: Iterable[Task]) -> dict[str, Spec]:
    """What the dataset adapters add to a caller's rows: the tasks' columns, then the error's."""
    return {**task_columns(tasks), **ERROR_COLUMNS}


def export_columns(*, quality: bool = False, probes: bool = False) -> dict[str, Spec]:
    """An export's columns (beside `image`): the record's own, every task's (a task the records
    lack is a column of nulls, so every export of a store has the same columns), the error's, then
    the statistics and probes' scores when some record holds them, then where the record came from."""
    columns = {**RECORD_COLUMNS, **api_columns(TASKS)}
    if quality:
        columns |= QUALITY_COLUMNS
    if probes:
        columns |= PROBE_COLUMNS
    return columns | PROVENANCE_COLUMNS


def row(record: Record, columns: Sequence[str] | dict[str, Spec]) -> dict[str, Any]:
    """One record's values for `columns` (names of this layout). A task column of a failed image,
    or of a task it was not annotated with, is None: "no tags above the threshold" ([]) stays apart
    from "not annotated" (None)."""
    values: dict[str, Any] = {}
    for spec in TASKS.values():
        output = getattr(record, spec.field)
        names = spec.output_type().COLUMNS
        if any(name in columns for name in names):
            values |= output.columns() if output is not None else dict.fromkeys(names)
    image = record.image
    quality = record.quality
    every: dict[str, Any] = {
        "uri": record.uri,
        "etag": record.etag,
        "bytes": record.bytes,
        "width": image.width if image else None,
        "height": image.height if image else None,
        "format": image.format if image else None,
        "error_kind": record.error.kind.value if record.error else None,
        "error_message": record.error.message if record.error else None,
        "quality": quality.model_dump() if quality else None,
        "probe_scores": (
            None if record.scores is None else [{"name": n, "score": s} for n, s in record.scores.items()]
        ),
        "signature": record.signature,
        "job_id": record.job_id,
        "processed_at": record.processed_at,
        **values,
    }
    return {name: every[name] for name in columns}


def columns_of(records: Sequence[Record], columns: Sequence[str] | dict[str, Spec]) -> dict[str, list[Any]]:
    """Records -> one list per column, one value per record."""
    rows = [row(record, columns) for record in records]
    return {name: [values[name] for values in rows] for name in columns}


def features(columns: dict[str, Spec], embedding_dim: int | None = None) -> Any:
    """`datasets.Features` of `columns`; the embedding a fixed-length list when `embedding_dim` is
    known (every record of an export has the same), so it reads as one 2-D array."""
    # by name, here: datasets is optional, heavy, and ships no type information
    datasets = importlib.import_module("datasets")
    types = {name: feature(datasets, kind) for name, kind in columns.items()}
    if embedding_dim is not None and "embedding" in types:
        types["embedding"] = datasets.List(datasets.Value("float32"), length=embedding_dim)
    return datasets.Features(types)


def feature(datasets: Any, kind: Spec) -> Any:
    """One column's type (`"string"`, `["float32"]`, `{"label": "string"}`) -> the `datasets` feature."""
    if isinstance(kind, list):
        return datasets.List(feature(datasets, kind[0]))
    if isinstance(kind, dict):
        return {name: feature(datasets, inner) for name, inner in kind.items()}
    return datasets.Value(kind)
