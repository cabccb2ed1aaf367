"""The `embedding` task on tiny CLIP and SigLIP checkpoints: unit norm, one vision forward shared
with tags, and the same vector back from every store (JSONL, Parquet, object sinks, PostgreSQL)."""

import base64
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from imagemill.api import Annotator
from imagemill.core.errors import ErrorKind, ModelLoadError
from imagemill.core.images import file_uri
from imagemill.core.schemas import Embedding, ImageRef, Record, RecordError
from imagemill.core.settings import Settings, get_settings
from imagemill.core.sinks import files, open_sink
from imagemill.core.sinks.files import ParquetSink, decode_records, encode_records, open_file_sink, read_records
from imagemill.core.sinks.postgres import PostgresSink, embedding_type
from imagemill.core.tasks import Task, parse_tasks
from imagemill.local.run import annotate_local
from imagemill.pipeline.engine import Engine
from imagemill.pipeline.models import load_runners
from tests.fixtures.images import photo_image

FLOAT16_TOLERANCE = 1e-3  # float16 keeps 11 significant bits: unit-norm components to ~5e-4


def settings_for(models: dict[str, Path], model: str = "tags", **overrides: object) -> Settings:
    return Settings(tags_model=str(models[model]), device="cpu", batch_size=4, tags_threshold=0.0, **overrides)


def projection_dim(config) -> int:
    # CLIP projects into projection_dim; SigLIP's image embedding is its vision tower's pooled output
    return config.projection_dim if config.model_type == "clip" else config.vision_config.hidden_size


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[ImageRef]:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(6):
        photo_image(96 + 8 * i, 64, seed=i).save(folder / f"{i}.png")
    return [ImageRef(uri=file_uri(folder / f"{i}.png")) for i in range(6)]


@pytest.fixture(scope="module")
def embedded(tiny_models: dict[str, Path], photos: list[ImageRef]) -> list[Record]:
    """Records of the six photos with tags and embeddings (CLIP), for the store round trips."""
    with Engine(settings_for(tiny_models), (Task.TAGS, Task.EMBEDDING)) as engine:
        return list(engine.annotate(photos, job_id="job-e"))


@pytest.mark.parametrize("model", ["tags", "tags_siglip"])
def test_the_embedding_is_unit_norm_with_the_models_projection_dim(
    tiny_models: dict[str, Path], photos: list[ImageRef], model: str
) -> None:
    with Engine(settings_for(tiny_models, model), (Task.EMBEDDING,)) as engine:
        records = list(engine.annotate(photos))
        dim = projection_dim(engine.runners[0].model.config)
    assert all(r.error is None and r.tags is None for r in records)
    vectors = np.stack([r.embedding.array() for r in records])
    assert vectors.shape == (len(photos), dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert len({v.tobytes() for v in vectors}) == len(photos)  # each image its own
    embedding = records[0].embedding
    assert (embedding.model, embedding.dim) == (str(tiny_models[model]), dim)
    assert embedding.revision and embedding.revision.startswith("sha256:")


@pytest.mark.parametrize("model", ["tags", "tags_siglip"])
def test_tags_and_embedding_asked_together_share_one_model_and_one_vision_forward_per_batch(
    tiny_models: dict[str, Path], photos: list[ImageRef], model: str
) -> None:
    settings = settings_for(tiny_models, model)
    with Engine(settings, (Task.TAGS,)) as alone:
        tags_only = list(alone.annotate(photos))
    with Engine(settings, (Task.TAGS, Task.EMBEDDING)) as engine:
        tags, embedding = engine.runners
        assert embedding.model is tags.model  # loaded once
        forwards: list[int] = []
        tags.model.vision_model.register_forward_hook(
            lambda module, args, output: forwards.append(len(output.pooler_output))
        )
        records = list(engine.annotate(photos))
    assert forwards == [4, 2]  # batch size 4: one forward per batch, none for the embedding
    assert [r.tags for r in records] == [r.tags for r in tags_only]
    assert all(r.embedding and r.embedding.dim == projection_dim(tags.model.config) for r in records)


def test_a_model_loaded_for_tags_earlier_is_shared_by_an_embedding_asked_for_later(tiny_models) -> None:
    """A worker loads models task by task as jobs ask for them (`Runtime.load`)."""
    settings = settings_for(tiny_models)
    (tags,) = load_runners(settings, (Task.TAGS,))
    (embedding,) = load_runners(settings, (Task.EMBEDDING,), loaded=[tags])
    assert embedding.model is tags.model and embedding.preprocess is tags.preprocess


def test_an_embedding_alone_embeds_no_vocabulary(tiny_models, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-vocabulary.txt"
    with pytest.raises(ModelLoadError, match="vocabulary"):
        load_runners(settings_for(tiny_models, tags_vocabulary=missing), (Task.TAGS,))
    (runner,) = load_runners(settings_for(tiny_models, tags_vocabulary=missing), (Task.EMBEDDING,))
    assert not hasattr(runner, "text_embeddings")


def test_the_signature_covers_the_embedding_and_its_storage_precision(tiny_models) -> None:
    tags = Engine(settings_for(tiny_models), (Task.TAGS,)).signature
    both = Engine(settings_for(tiny_models), (Task.TAGS, Task.EMBEDDING)).signature
    half = Engine(settings_for(tiny_models, embedding_dtype="float16"), (Task.TAGS, Task.EMBEDDING)).signature
    siglip = Engine(settings_for(tiny_models, "tags_siglip"), (Task.EMBEDDING,)).signature
    assert len({tags, both, half, siglip}) == 4


def test_float16_storage_rounds_the_vector_to_float16_values(tiny_models, photos: list[ImageRef]) -> None:
    with Engine(settings_for(tiny_models, embedding_dtype="float16"), (Task.EMBEDDING,)) as engine:
        vector = next(iter(engine.annotate(photos[:1]))).embedding.array()
    np.testing.assert_array_equal(vector.astype(np.float16).astype(np.float32), vector)
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, atol=FLOAT16_TOLERANCE)


def test_jsonl_holds_base64_of_little_endian_float32_that_plain_numpy_reads(
    embedded: list[Record], tmp_path: Path
) -> None:
    out = tmp_path / "records.jsonl"
    with open_file_sink(str(out)) as writer:
        writer.write(embedded)
    line = json.loads(out.read_text().splitlines()[0])
    assert set(line["embedding"]) == {"model", "revision", "dim", "vector"}
    # as the README shows: no imagemill needed to read it back
    vector = np.frombuffer(base64.b64decode(line["embedding"]["vector"]), dtype="<f4")
    np.testing.assert_array_equal(vector, embedded[0].embedding.array())
    assert vector.shape == (line["embedding"]["dim"],)
    assert [r.embedding for r in read_records(out)] == [r.embedding for r in embedded]


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 0.0), ("float16", FLOAT16_TOLERANCE)])
def test_parquet_holds_a_fixed_size_list_of_the_configured_precision(
    embedded: list[Record], tmp_path: Path, dtype: str, tolerance: float
) -> None:
    out = tmp_path / "records.parquet"
    with open_file_sink(str(out), embedding_dtype=dtype) as writer:
        writer.write(embedded)
    dim = embedded[0].embedding.dim
    column = pq.read_schema(out).field("embedding").type.field("vector").type
    assert column == pa.list_(pa.float16() if dtype == "float16" else pa.float32(), dim)
    back = read_records(out)
    for before, after in zip(embedded, back, strict=True):
        assert after.embedding.dim == dim and after.embedding.model == before.embedding.model
        np.testing.assert_allclose(after.embedding.array(), before.embedding.array(), rtol=0, atol=tolerance)


@pytest.mark.parametrize("hold", [16_384, 2])
def test_a_parquet_file_whose_first_rows_have_no_embedding_still_holds_the_later_ones(
    embedded: list[Record], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hold: int
) -> None:
    """The schema needs the vector's length: rows wait for one that shows it, up to HOLD_ROWS, and
    then the file takes a plain list (as a file of no embeddings does)."""
    monkeypatch.setattr(ParquetSink, "ROW_GROUP", 2)
    monkeypatch.setattr(files, "HOLD_ROWS", hold)
    failed = [
        Record(
            uri=f"file:///gone/{i}.png",
            signature=embedded[0].signature,
            error=RecordError(kind=ErrorKind.NOT_FOUND, message="gone"),
        )
        for i in range(4)
    ]
    out = tmp_path / "records.parquet"
    with open_file_sink(str(out)) as writer:
        writer.write(failed)
        writer.write(embedded)
    vector = pq.read_schema(out).field("embedding").type.field("vector").type
    assert vector == (pa.list_(pa.float32(), embedded[0].embedding.dim) if hold > 4 else pa.list_(pa.float32()))
    assert [r.embedding for r in read_records(out)] == [None] * 4 + [r.embedding for r in embedded]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_object_sink_chunks_carry_the_embedding(embedded: list[Record], fmt: str) -> None:
    back = decode_records(encode_records(embedded, fmt, "float32"), fmt)
    assert [r.embedding for r in back] == [r.embedding for r in embedded]


def test_a_file_sink_takes_its_parquet_precision_from_the_environment(
    embedded: list[Record], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEMILL_EMBEDDING_DTYPE", "float16")
    with open_sink(f"file://{tmp_path}/?format=parquet") as sink:
        sink.write(embedded, "job-e/000000")
    (chunk,) = tmp_path.rglob("*.parquet")
    assert pq.read_schema(chunk).field("embedding").type.field("vector").type.value_type == pa.float16()
    back = decode_records(chunk.read_bytes(), "parquet")
    for before, after in zip(embedded, back, strict=True):
        np.testing.assert_allclose(after.embedding.array(), before.embedding.array(), atol=FLOAT16_TOLERANCE)


def test_the_python_api_gives_embedding_columns(tiny_models, photos: list[ImageRef]) -> None:
    with Annotator("tags,embedding", settings=settings_for(tiny_models)) as annotator:
        columns = annotator.for_datasets()({"image": [photo_image(80, 64, seed=1), b"not an image"]})
        features = annotator.for_datasets().features()
    first, broken = columns["embedding"]
    assert first.dtype == np.float32 and abs(float(np.linalg.norm(first)) - 1.0) < 1e-5
    assert broken is None
    assert "embedding" in features


def test_annotate_writes_tags_and_embeddings_to_parquet(
    model_env: dict[str, str], photos: list[ImageRef], tmp_path: Path
) -> None:
    folder = Path(photos[0].uri.removeprefix("file://")).parent
    out = tmp_path / "annotations.parquet"
    # in this process (a subprocess costs seconds of imports): what `imagemill annotate
    # FOLDER --tasks tags,embedding --out annotations.parquet` runs after parsing its options
    counts = annotate_local(str(folder), parse_tasks("tags,embedding"), out, get_settings())
    assert counts["annotated"] == len(photos)
    records = read_records(out)
    assert len(records) == len(photos) and all(r.tags and r.embedding for r in records)
    dim = records[0].embedding.dim
    assert pq.read_schema(out).field("embedding").type.field("vector").type == pa.list_(pa.float32(), dim)
    np.testing.assert_allclose([np.linalg.norm(r.embedding.array()) for r in records], 1.0, atol=1e-5)


def test_an_embedding_whose_bytes_do_not_match_its_dim_is_refused() -> None:
    with pytest.raises(ValueError, match="dim 3 needs 12"):
        Embedding(model="m", dim=3, vector=b"\0" * 8)


# -- PostgreSQL -------------------------------------------------------------------------------------


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresSink]:
    writer = PostgresSink(f"{pg_url}?table=e_{secrets.token_hex(4)}")
    yield writer
    writer.close()


def test_postgresql_keeps_the_vector_in_a_real_array_column_and_in_the_record(
    store: PostgresSink, pg_url: str, embedded: list[Record]
) -> None:
    store.write(embedded, "job-e/000000")
    assert [r.embedding for r in store.records()] == [r.embedding for r in sorted(embedded, key=lambda r: r.uri)]
    with psycopg.connect(pg_url) as conn:
        assert embedding_type(conn) == "real[]"  # this server has no pgvector
        kind = conn.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = to_regclass(%s)"
            " AND attname = 'embedding'",
            (store.table,),
        ).fetchone()
        assert kind == ("real[]",)
        query = sql.SQL("SELECT uri, embedding FROM {} ORDER BY uri").format(sql.Identifier(store.view))
        stored = dict(conn.execute(query).fetchall())
    for record in embedded:
        np.testing.assert_array_equal(np.asarray(stored[record.uri], dtype=np.float32), record.embedding.array())


def test_a_version_2_table_gains_the_embedding_column_in_place(pg_url: str, embedded: list[Record]) -> None:
    table = f"e_{secrets.token_hex(4)}"
    with PostgresSink(f"{pg_url}?table={table}") as store:
        store.write(embedded[:1], "a/1")
        view = store.view
    with psycopg.connect(pg_url, autocommit=True) as conn:  # back to what schema version 2 made
        conn.execute(sql.SQL("DROP VIEW {}").format(sql.Identifier(view)))
        conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN embedding").format(sql.Identifier(table)))
    with PostgresSink(f"{pg_url}?table={table}") as store:
        store.write(embedded[1:2], "a/2")
        assert store.count() == 2
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(sql.SQL("SELECT embedding IS NULL FROM {} ORDER BY uri").format(sql.Identifier(view)))
        assert sorted(row[0] for row in rows.fetchall()) == [False, True]  # the old row had none stored
