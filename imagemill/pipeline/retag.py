"""Retag: new tags for stored records from their embeddings, with no image read and no vision tower.

The text tower of the model that made the embeddings is loaded once, when the first record with an
embedding names it, and embeds the new vocabulary once; each batch is then one matrix product
through the tags runner's own scoring (`zero_shot`). Records come as pydantic records (any source)
or, for Parquet to Parquet, as Arrow batches: then no record object is ever built (the columnar
path), which is what makes a million records take seconds rather than minutes.
"""

import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from imagemill.core.errors import UserError
from imagemill.core.schemas import Embedding, Record, Task
from imagemill.core.settings import Settings
from imagemill.pipeline.models.runner import model_id
from imagemill.pipeline.models.text_tower import TextTower
from imagemill.pipeline.models.zero_shot import TagOptions, ZeroShotScorer, tags_of
from imagemill.pipeline.signature import retag_signature

# uris of records without an embedding kept for the summary; the rest are only counted
EXAMPLES = 5


@dataclass
class RetagCounts:
    """What a retag did: records re-tagged, records passed over for want of an embedding (with the
    first few uris), and each old signature with the new one it became."""

    retagged: int = 0
    without_embedding: int = 0
    examples: list[str] = field(default_factory=list)
    signatures: dict[str, str] = field(default_factory=dict)

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
        return [
            record.model_copy(update={"tags": tag, "signature": self.signature(record.signature), "processed_at": now})
            for record, tag in zip(embedded, tags, strict=True)
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
        old = table.column("signature")
        distinct = pc.unique(old)
        new = pa.array([self.signature(s) for s in distinct.to_pylist()], pa.string()).take(pc.index_in(old, distinct))
        stamp_type = table.schema.field("processed_at").type
        now = pa.repeat(pa.scalar(datetime.now(UTC), stamp_type), rows)
        for name_, column in (("tags", tags), ("signature", new), ("processed_at", now)):
            index = table.schema.get_field_index(name_)
            table = table.set_column(index, table.schema.field(index), column)
        self.counts.retagged += rows
        return table

    def signature(self, old: str) -> str:
        """The new signature of records that had `old` (one per old signature, remembered)."""
        if old not in self.counts.signatures:
            assert self.model is not None
            name, revision = self.model
            self.counts.signatures[old] = retag_signature(old, name, revision, self.options.signature_options())
        return self.counts.signatures[old]

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
