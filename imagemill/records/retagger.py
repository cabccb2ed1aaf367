"""Retag: new tags for stored records from their embeddings, with no image read and no vision tower.

The text tower of the model that made the embeddings is loaded once, when the first record with an
embedding names it, and embeds the new vocabulary once; each batch is then one matrix product
through the tags runner's own scoring (`zero_shot`). Records come as pydantic records (any source)
or, for Parquet to Parquet, as Arrow batches: then no record object is ever built (the columnar
path), which is what makes a million records take seconds rather than minutes.
"""

import binascii
import functools
import itertools
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import TypeAdapter

from imagemill.core.errors import UserError
from imagemill.core.schemas import EMBEDDING_DTYPE, Embedding, Record
from imagemill.core.settings import Settings
from imagemill.core.sinks.base import RetaggedRow, StoredEmbeddings
from imagemill.core.sinks.files import options_text, parquet_record
from imagemill.core.tasks import TASKS, Task
from imagemill.pipeline.models.device import one_thread
from imagemill.pipeline.models.runner import model_id
from imagemill.pipeline.models.text_tower import TextTower
from imagemill.pipeline.models.zero_shot import TagOptions, ZeroShotScorer, tags_of
from imagemill.pipeline.signature import record_parts, retag_signature, signature_of

# uris of records without an embedding kept for the summary; the rest are only counted
EXAMPLES = 5


@dataclass(frozen=True)
class NewSignature:
    """What records of one old signature become: the signature and task options a run with the new
    tags settings (and the same settings for every other task) gives them, when their parts are
    known (`matches_runs`); else a signature of retag's own, which no run computes."""

    signature: str
    task_options: dict[str, dict[str, Any]] | None
    matches_runs: bool

    @functools.cached_property
    def options_text(self) -> str | None:
        """`task_options` as JSON text (keys sorted), made once for all its records."""
        if self.task_options is None:
            return None
        return orjson.dumps(self.task_options, option=orjson.OPT_SORT_KEYS).decode()


@dataclass
class RetagCounts:
    """What a retag did: records re-tagged, records passed over for want of an embedding (with the
    first few uris), each old signature with the new one it became, and how many records got a
    signature of retag's own (their tasks' options unknown: a run annotates them again)."""

    retagged: int = 0
    without_embedding: int = 0
    examples: list[str] = field(default_factory=list)
    signatures: dict[str, str] = field(default_factory=dict)
    own_signature: int = 0

    def passed_over(self, count: int, uris: list[str]) -> None:
        """`count` more records without an embedding; `uris` the first few of them."""
        self.without_embedding += count
        self.examples.extend(uris[: EXAMPLES - len(self.examples)])


class Retagger:
    """Re-tags batches of records with one vocabulary and its options. The model is the one the
    records' embeddings name (`embedding.model` and `.revision`); IMAGEMILL_TAGS_MODEL, when set,
    may only point at the same weights (a copy elsewhere), and records of a second model are refused."""

    def __init__(self, settings: Settings, options: TagOptions, device: torch.device) -> None:
        self.settings = settings
        self.options = options
        self.device = device
        self.counts = RetagCounts()
        self.model: tuple[str, str | None] | None = None
        self.tower: TextTower | None = None  # loaded by the first record with an embedding
        self._scorer: ZeroShotScorer | None = None
        self._words = pa.array([], pa.string())  # the vocabulary as Arrow strings, for the columnar path
        self._dim = 0  # of the text embeddings, once loaded
        self._first_dim = 0  # of the first record's embedding
        # (old signature, whether the record keeps its task options) -> what it becomes
        self._signatures: dict[tuple[str, bool], NewSignature] = {}

    def records(self, records: list[Record]) -> list[Record]:
        """The records that have an embedding, with new tags, signature and processed_at; the others
        are counted (their records are not written: nothing here can tag them)."""
        embedded = [record for record in records if record.embedding is not None]
        missing = [record.uri for record in records if record.embedding is None]
        self.counts.passed_over(len(missing), missing)
        if not embedded:
            return []
        for record in embedded:
            assert record.embedding is not None  # filtered above; mypy cannot see through the list
            self._check(record.embedding.model, record.embedding.revision, record.embedding.dim, record.uri)
        vectors = np.stack([_vector(record.embedding) for record in embedded])
        scorer = self._loaded_scorer()
        self._check_dim(vectors.shape[1])
        assert self.model is not None
        tags = tags_of(scorer.top(torch.from_numpy(vectors)), scorer.vocabulary, *self.model)
        now = datetime.now(UTC)
        self.counts.retagged += len(embedded)
        retagged = []
        for record, tag in zip(embedded, tags, strict=True):
            new = self.signature(record)
            self.counts.own_signature += not new.matches_runs
            update = {"tags": tag, "signature": new.signature, "processed_at": now, "task_options": new.task_options}
            retagged.append(record.model_copy(update=update))
        return retagged

    def json_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The JSON path (JSONL to JSONL): records as the JSON objects they were read as, the ones
        with an embedding returned with `tags`, `signature`, `processed_at` and `task_options`
        replaced and every other field as it was (the objects themselves, changed in place); no
        record object is built but one per old signature. A row that is not a record is validated,
        so its error is pydantic's."""
        embedded: list[dict[str, Any]] = []
        vectors: list[bytes] = []
        missing: list[str] = []
        models: dict[tuple[Any, ...], int] = {}  # each (model, revision, dim) with its first row
        for row in rows:
            embedding = row.get("embedding") if isinstance(row, dict) else None
            if embedding is None and isinstance(row, dict) and isinstance(row.get("uri"), str):
                missing.append(row["uri"])
                continue
            vector = _fast_vector(embedding)
            if vector is not None:
                assert isinstance(embedding, dict)  # `_fast_vector` reads only those
                model = (embedding["model"], embedding.get("revision"), embedding["dim"])
            else:  # not the shape imagemill writes: validated, and read the slow way
                record = Record.model_validate(row)
                if record.embedding is None:
                    missing.append(record.uri)
                    continue
                vector = record.embedding.vector
                model = (record.embedding.model, record.embedding.revision, record.embedding.dim)
            models.setdefault(model, len(embedded))
            embedded.append(row)
            vectors.append(vector)
        self.counts.passed_over(len(missing), missing)
        if not embedded:
            return []
        for (name, revision, dim), first in models.items():
            self._check(name, revision, dim, embedded[first]["uri"])
        tags = self._tag_objects(np.frombuffer(b"".join(vectors), EMBEDDING_DTYPE).reshape(len(embedded), -1))
        stamp = json_time(datetime.now(UTC))
        known = self._signatures
        own = 0
        for row, tag in zip(embedded, tags, strict=True):
            key = (row["signature"], row.get("task_options") is not None)
            new = known.get(key) or self.signature_of_key(key, row)
            row["tags"] = tag
            row["signature"] = new.signature
            row["processed_at"] = stamp
            if new.task_options is not None:
                row["task_options"] = new.task_options
            elif "task_options" in row:
                del row["task_options"]
            own += not new.matches_runs
        self.counts.own_signature += own
        self.counts.retagged += len(embedded)
        return embedded

    def load_for(self, rows: list[dict[str, Any]]) -> bool:
        """The text tower loaded as `json_rows` loads it for the first of `rows` with an embedding as
        imagemill writes it (its model checked), before any is scored: processes forked then share
        it. Whether one was there (or the tower was loaded already)."""
        if self._scorer is not None:
            return True
        for row in rows:
            embedding = row.get("embedding")
            vector = _fast_vector(embedding)
            if vector is not None:
                assert isinstance(embedding, dict)  # `_fast_vector` reads only those
                self._check(embedding["model"], embedding.get("revision"), embedding["dim"], row["uri"])
                self._loaded_scorer()
                return True
        return False

    @property
    def known_signatures(self) -> dict[tuple[str, bool], NewSignature]:
        """What each (old signature, whether the record keeps its task options) became so far."""
        return self._signatures

    def merge(self, counts: RetagCounts, signatures: dict[tuple[str, bool], NewSignature]) -> None:
        """What another process's retagger did (one part of the records, in order after the parts
        merged so far) added to this one's."""
        self.counts.retagged += counts.retagged
        self.counts.passed_over(counts.without_embedding, counts.examples)
        self.counts.signatures.update(counts.signatures)
        self.counts.own_signature += counts.own_signature
        for key, new in signatures.items():
            self._signatures.setdefault(key, new)

    def stored(self, batch: StoredEmbeddings, record: Callable[[int], Record]) -> list[RetaggedRow]:
        """The keyed path (a PostgreSQL store retagged in place): keys and vectors in, one
        `RetaggedRow` per record with an embedding out (the database builds the new rows from the
        old ones). `record(i)` reads the whole record of row `i`, asked once per old signature."""
        missing = [uri for uri, model in zip(batch.uris, batch.models, strict=True) if model is None]
        self.counts.passed_over(len(missing), missing)
        rows = [i for i, model in enumerate(batch.models) if model is not None]
        if not rows:
            return []
        for model, first in _first_of_each([batch.models[i] for i in rows]).items():
            name, revision, dim = model
            self._check(name, revision, dim, batch.uris[rows[first]])
        tags = self._tag_objects(batch.vectors)
        out = []
        for i, tag in zip(rows, tags, strict=True):
            new = self.signature_of_key((batch.signatures[i], batch.known_options[i]), functools.partial(record, i))
            key = (batch.uris[i], batch.etags[i], batch.signatures[i])
            # orjson: a fifth of json.dumps' time, the same JSON once the database has parsed it
            out.append(RetaggedRow(*key, new.signature, orjson.dumps(tag).decode(), new.options_text))
            self.counts.own_signature += not new.matches_runs
        self.counts.retagged += len(out)
        return out

    def signature_of_key(self, key: tuple[str, bool], record: dict[str, Any] | Callable[[], Record]) -> NewSignature:
        """`signature` for a record known by its key (old signature, whether it keeps its task
        options) until its signature's first record is needed: then `record` gives it."""
        if key not in self._signatures:
            whole = Record.model_validate(record) if isinstance(record, dict) else record()
            self.signature(whole)
        return self._signatures[key]

    def _tag_objects(self, vectors: np.ndarray) -> list[dict[str, Any]]:
        """The `tags` of each row of `vectors` as the JSON object a record holds."""
        scorer = self._loaded_scorer()
        self._check_dim(vectors.shape[1])
        assert self.model is not None
        name, revision = self.model
        # torch on one thread for a batch's scoring on the JSON and keyed paths: the product is a fifth of
        # their work, and reading and writing keep the other core busy meanwhile; a second thread saved
        # little of its time and spun between batches (13 us of CPU a record, measured: 45 against 30)
        with warnings.catch_warnings(), one_thread():
            warnings.simplefilter("ignore", UserWarning)  # a read-only buffer: the scoring only reads it
            top = scorer.top(torch.from_numpy(vectors))
        words = scorer.vocabulary
        indices, scores, offsets = top.indices.tolist(), top.scores.tolist(), top.offsets.tolist()
        return [
            {
                "model": name,
                "revision": revision,
                "labels": [{"tag": words[indices[j]], "score": scores[j]} for j in range(start, stop)],
            }
            for start, stop in itertools.pairwise(offsets)
        ]

    def table(self, batch: pa.RecordBatch) -> pa.Table:
        """The columnar path: a batch of a records Parquet file -> its rows that have an embedding,
        with the `tags`, `signature` and `processed_at` columns replaced, the rest as they were."""
        table = pa.Table.from_batches([batch])
        if "embedding" not in table.schema.names:  # a file written before embeddings existed
            self.counts.passed_over(table.num_rows, table.column("uri").slice(0, EXAMPLES).to_pylist())
            return table.slice(0, 0)
        has = _has_embedding(table.column("embedding"))
        if not pc.all(has).as_py():  # filtering copies every column: only when some row lacks one
            missing = table.filter(pc.invert(has))
            self.counts.passed_over(missing.num_rows, missing.column("uri").slice(0, EXAMPLES).to_pylist())
            table = table.filter(has)
        if not table.num_rows:
            return table
        embedding = table.column("embedding").combine_chunks()
        self._check_columns(embedding, table.column("uri"))
        vectors = pc.struct_field(embedding, "vector")  # offset-aware, unlike StructArray.field
        values = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(vectors), -1)
        scorer = self._loaded_scorer()
        self._check_dim(values.shape[1])
        with warnings.catch_warnings():
            # Arrow's buffers are read-only and torch warns of that; the scoring only reads them (no copy)
            warnings.simplefilter("ignore", UserWarning)
            embeddings = torch.from_numpy(values.astype(np.float32, copy=False))
        top = scorer.top(embeddings)
        tags_type = table.schema.field("tags").type
        labels = pa.ListArray.from_arrays(
            pa.array(top.offsets, pa.int32()),
            pa.StructArray.from_arrays(
                [self._words.take(pa.array(top.indices)), pa.array(top.scores, pa.float64())],
                fields=list(tags_type.field("labels").type.value_type),
            ),
        )
        assert self.model is not None
        name, revision = self.model
        rows = table.num_rows
        tags = pa.StructArray.from_arrays(
            [pa.repeat(pa.scalar(name, pa.string()), rows), pa.repeat(pa.scalar(revision, pa.string()), rows), labels],
            fields=list(tags_type),
        )
        signature, task_options = self._signature_columns(table)
        stamp_type = table.schema.field("processed_at").type
        now = pa.repeat(pa.scalar(datetime.now(UTC), stamp_type), rows)
        replaced = [("tags", tags), ("signature", signature), ("processed_at", now)]
        if task_options is not None:
            replaced.append(("task_options", task_options))
        for name_, column in replaced:
            index = table.schema.get_field_index(name_)
            table = table.set_column(index, table.schema.field(index), column)
        self.counts.retagged += rows
        return table

    def signature(self, record: Record) -> NewSignature:
        """The new signature of `record` and of every record of its old signature (remembered).

        The signature a run computes with the new tags settings and, for every other task, the
        settings the record was made with: its parts are the record's own (each output's model and
        revision, `task_options`) with the tags' part replaced, or added for a record made without
        tags. Used only when those parts give the record's old signature back; otherwise (a record
        from before `task_options` was kept) a signature of retag's own, derived from the old one."""
        key = (record.signature, record.task_options is not None)
        if key not in self._signatures:
            assert self.model is not None
            name, revision = self.model
            tag_options = self.options.signature_options()
            outputs = _outputs(record)
            new: NewSignature | None = None
            if record.task_options is not None:
                try:
                    known = signature_of(record_parts(outputs, record.task_options)) == record.signature
                except KeyError:  # a task without its options
                    known = False
                if known:
                    options = {**record.task_options, Task.TAGS.value: tag_options}
                    parts = record_parts({**outputs, Task.TAGS: (name, revision)}, options)
                    new = NewSignature(signature_of(parts), _in_task_order(options), matches_runs=True)
            if new is None:
                derived = retag_signature(record.signature, name, revision, tag_options)
                new = NewSignature(derived, record.task_options, matches_runs=False)
            self._signatures[key] = new
            self.counts.signatures[record.signature] = new.signature
        return self._signatures[key]

    def _signature_columns(self, table: pa.Table) -> tuple[pa.Array, pa.Array | None]:
        """The columnar path's new `signature` column and, when the file has one, `task_options`:
        one record per distinct old signature is built to find what its signature becomes."""
        old = table.column("signature")
        has_options = "task_options" in table.schema.names
        flags = pc.is_valid(table.column("task_options")) if has_options else pa.repeat(False, table.num_rows)
        keys = pa.Table.from_arrays([old, flags], names=["signature", "known"]).append_column(
            "row", pa.array(np.arange(table.num_rows))
        )
        first = keys.group_by(["signature", "known"], use_threads=False).aggregate([("row", "min")])
        news = {}
        for row in first.to_pylist():
            record = parquet_record(table.slice(row["row_min"], 1).to_pylist()[0])
            news[row["signature"], row["known"]] = self.signature(record)
        lookup = [(sig, known) for sig, known in zip(old.to_pylist(), flags.to_pylist(), strict=True)]
        chosen = [news[key] for key in lookup]
        self.counts.own_signature += sum(not new.matches_runs for new in chosen)
        signature = pa.array([new.signature for new in chosen], pa.string())
        if not has_options:
            return signature, None
        texts = [None if new.task_options is None else options_text(new.task_options) for new in chosen]
        return signature, pa.array(texts, pa.string())

    # -- the model ---------------------------------------------------------------------------------

    def _check(self, name: str, revision: str | None, dim: int, uri: str) -> None:
        if self.model is None:
            self.model = (name, revision)
        elif (name, revision) != self.model:
            first = _named(*self.model)
            raise UserError(f"{uri}: its embedding is from {_named(name, revision)}, earlier ones from {first}")
        if self._first_dim and dim != self._first_dim:
            raise UserError(f"{uri}: its embedding has {dim} values, earlier ones {self._first_dim}")
        self._first_dim = dim

    def _check_dim(self, dim: int) -> None:
        if dim != self._dim:
            name = _named(*self.model) if self.model else "the model"
            raise UserError(f"the embeddings have {dim} values, but {name}'s text embeddings have {self._dim}")

    def _check_columns(self, embedding: pa.StructArray, uris: pa.ChunkedArray) -> None:
        models = pa.Table.from_arrays(
            [*(pc.struct_field(embedding, name) for name in ("model", "revision", "dim")), uris.combine_chunks()],
            names=["model", "revision", "dim", "uri"],
        )
        # one row per distinct (model, revision, dim): each is checked like a record
        first = models.group_by(["model", "revision", "dim"], use_threads=False).aggregate([("uri", "min")])
        for row in first.to_pylist():
            self._check(row["model"], row["revision"], row["dim"], row["uri_min"])

    def _loaded_scorer(self) -> ZeroShotScorer:
        if self._scorer is None:
            assert self.model is not None
            self.tower = TextTower(*self._source(*self.model), self.device)
            self._scorer = self.tower.scorer(self.options)
            self._words = pa.array(self._scorer.vocabulary, pa.string())
            self._dim = int(self._scorer.text_embeddings.shape[1])
        return self._scorer

    def _source(self, name: str, revision: str | None) -> tuple[str, str | None]:
        """Where to load the records' model from: its own name, or IMAGEMILL_TAGS_MODEL when that
        holds the same weights; a directory is loaded as it is (its revision is a hash of its weights)."""
        configured = self.settings.tags_model if "tags_model" in self.settings.model_fields_set else None
        chosen = name if configured in (None, name) else str(configured)
        actual = model_id(chosen, None if Path(chosen).is_dir() else revision or self.settings.revision(Task.TAGS))
        if revision is not None and actual.revision is not None and actual.revision != revision:
            where = "IMAGEMILL_TAGS_MODEL=" + chosen if chosen != name else chosen
            raise UserError(
                f"the records' embeddings are from {_named(name, revision)}, but {where} holds other weights"
                f" ({actual.revision}): point IMAGEMILL_TAGS_MODEL at the model that made them"
            )
        return chosen, None if Path(chosen).is_dir() else revision


def _fast_vector(embedding: object) -> bytes | None:
    """An embedding's vector from its JSON object when it is as imagemill writes it (standard
    base64 of `dim` float32 values); None for anything else, which is then validated."""
    if not isinstance(embedding, dict):
        return None
    text, dim = embedding.get("vector"), embedding.get("dim")
    if not isinstance(text, str) or not isinstance(dim, int) or not isinstance(embedding.get("model"), str):
        return None
    try:
        vector = binascii.a2b_base64(text, strict_mode=True)  # b64decode(validate=True), a quarter faster
    except binascii.Error:
        return None
    return vector if len(vector) == EMBEDDING_DTYPE.itemsize * dim > 0 else None


def _first_of_each(models: list[Any]) -> dict[Any, int]:  # Any: tuples of a model, hashable
    """Each distinct value with the index of its first occurrence."""
    first: dict[Any, int] = {}
    for index, model in enumerate(models):
        first.setdefault(model, index)
    return first


_TIME = TypeAdapter(datetime)


def json_time(moment: datetime) -> str:
    """A time as a record's JSON writes it (pydantic's form)."""
    text: str = _TIME.dump_python(moment, mode="json")
    return text


def _outputs(record: Record) -> dict[Task, tuple[str, str | None]]:
    """The model and revision of each task's output the record holds."""
    found = {}
    for task, spec in TASKS.items():
        output = getattr(record, spec.field)
        if output is not None:
            found[task] = (output.model, output.revision)
    return found


def _in_task_order(options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {task.value: options[task.value] for task in TASKS if task.value in options}


def _vector(embedding: Embedding | None) -> np.ndarray:
    assert embedding is not None
    return embedding.array()


def _has_embedding(column: pa.ChunkedArray) -> pa.ChunkedArray:
    # a struct whose vector is null is as good as none
    return pc.and_(pc.is_valid(column), pc.is_valid(pc.struct_field(column, "vector")))


def _named(name: str, revision: str | None) -> str:
    return f"{name}@{revision}" if revision else name


def retag_columnar(
    batches: Iterable[pa.RecordBatch],
    write: Callable[[pa.Table], None],
    retagger: Retagger,
    advance: Callable[[int], None],
) -> None:
    """Re-tag Arrow batches into `write`, three stages overlapped: the next batch is read (Parquet
    decoding) and the last one written (encoding, compression) on threads while this one is scored
    (pyarrow and torch release the GIL). At most three batches are held."""
    source = iter(batches)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="retag-io") as pool:
        reading = pool.submit(next, source, None)
        writing: Future[None] | None = None
        while (batch := reading.result()) is not None:
            reading = pool.submit(next, source, None)
            table = retagger.table(batch)
            if writing is not None:
                writing.result()  # in order, and a failed write stops the run here
            writing = pool.submit(write, table)
            advance(batch.num_rows)
        if writing is not None:
            writing.result()
