"""A local run's output file: JSONL or Parquet, written beside the target and moved into place at the
end; every record read back equal; an incremental run keeps the earlier error-free records."""

import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagemill.core.errors import ErrorKind, UserError
from imagemill.core.schemas import Caption, Embedding, Moderation, Record, RecordError, Tags, TagScore
from imagemill.core.sinks import files
from imagemill.core.sinks.files import (
    VECTOR_COLUMN,
    JsonlSink,
    ParquetSink,
    decode_records,
    encode_records,
    json_rows,
    line_ranges,
    open_file_sink,
    read_records,
)
from imagemill.core.sinks.objects import split_format

FORMATS = ("jsonl", "parquet")


def annotated(uri: str, *, dim: int | None = 4, seed: int = 0) -> Record:
    """A record with every task's output (an embedding of `dim` values, or none)."""
    vector = np.random.default_rng(seed).standard_normal(dim or 1).astype(np.float32)
    return Record(
        uri=uri,
        etag="e1",
        signature="sig",
        job_id="job",
        caption=Caption(text="a dog on a sofa", model="blip", prompt="a photo of"),
        moderation=Moderation(flagged=True, scores={"nsfw": 0.75, "normal": 0.25}, model="vit"),
        tags=Tags(labels=[TagScore(tag="dog", score=0.5), TagScore(tag="sofa", score=0.25)], model="clip"),
        embedding=Embedding.of(vector, model="clip") if dim else None,
    )


def failed(uri: str) -> Record:
    return Record(
        uri=uri, etag="e1", signature="sig", error=RecordError(kind=ErrorKind.NOT_AN_IMAGE, message="not a picture")
    )


def written(path: Path, *batches: list[Record]) -> list[Record]:
    with open_file_sink(str(path)) as writer:
        for batch in batches:
            writer.write(batch)
    return read_records(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_record_reads_back_equal_and_in_order(tmp_path: Path, fmt: str) -> None:
    records = [annotated(f"file:///p/{i}.jpg", seed=i) for i in range(5)] + [failed("file:///p/bad.jpg")]
    assert written(tmp_path / f"out.{fmt}", records[:2], [], records[2:]) == records


@pytest.mark.parametrize("suffix", [".parquet", ".PARQUET", ".jsonl", ".JSONL"])
def test_the_format_follows_the_suffix_in_any_case(tmp_path: Path, suffix: str) -> None:
    writer = open_file_sink(str(tmp_path / f"out{suffix}"))
    writer.abort()
    assert type(writer) is (ParquetSink if suffix.lower() == ".parquet" else JsonlSink)


def test_another_suffix_or_a_missing_folder_is_one_line_naming_the_option(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^--out .*out\.csv: the file name must end in \.jsonl or \.parquet$"):
        open_file_sink(str(tmp_path / "out.csv"))
    with pytest.raises(UserError, match=r"^--out .*: folder .*missing does not exist$"):
        open_file_sink(str(tmp_path / "missing" / "out.jsonl"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_nothing_is_at_the_target_until_close_moves_the_file_into_place(tmp_path: Path, fmt: str) -> None:
    target = tmp_path / f"out.{fmt}"
    writer = open_file_sink(str(target))
    writer.write([annotated("file:///p/a.jpg")])
    assert not target.exists() and writer.partial == tmp_path / f".out.{fmt}.partial"
    writer.close()
    assert not writer.partial.exists() and [r.uri for r in read_records(target)] == ["file:///p/a.jpg"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_incremental_run_keeps_the_earlier_error_free_records_it_is_asked_to(tmp_path: Path, fmt: str) -> None:
    target = tmp_path / f"out.{fmt}"
    a, b, bad = annotated("file:///p/a.jpg", seed=1), annotated("file:///p/b.jpg", seed=2), failed("file:///p/x.jpg")
    written(target, [a, b, bad])
    with open_file_sink(str(target), keep_existing=True) as writer:
        assert writer.existing_keys([a.key, b.key, bad.key, ("file:///p/new.jpg", "e", "s")]) == {a.key, b.key}
        writer.keep([a.key, a.key, bad.key])  # asked twice, and a failed one: a is kept once, the error redone
        writer.write([annotated("file:///p/new.jpg", seed=3)])
    assert [r.uri for r in read_records(target)] == ["file:///p/a.jpg", "file:///p/new.jpg"]
    assert read_records(target)[0] == a  # as it was, its processed_at too


@pytest.mark.parametrize("fmt", FORMATS)
def test_without_keep_existing_the_earlier_records_are_not_offered(tmp_path: Path, fmt: str) -> None:
    target = tmp_path / f"out.{fmt}"
    a = annotated("file:///p/a.jpg")
    written(target, [a])
    with open_file_sink(str(target)) as writer:
        assert writer.existing_keys([a.key]) == set()
        writer.keep([a.key])
    assert read_records(target) == []


# Parquet: row groups, the embedding column's type, and the encodings


def test_parquet_rows_are_written_in_row_groups_once_an_embedding_fixes_the_vector_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ParquetSink, "ROW_GROUP", 4)
    target = tmp_path / "out.parquet"
    writer = open_file_sink(str(target))
    assert isinstance(writer, ParquetSink)
    writer.write([annotated(f"file:///p/{i}.jpg", seed=i) for i in range(3)])
    assert not writer.partial.exists()  # under a row group: held
    writer.write([annotated("file:///p/3.jpg", seed=3)])
    assert writer.partial.exists()  # a full row group begins the file
    writer.write([annotated("file:///p/4.jpg", seed=4)])
    writer.close()
    meta = pq.ParquetFile(target)
    assert [meta.metadata.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 1]
    vector = meta.schema_arrow.field("embedding").type.field("vector").type
    assert vector.list_size == 4 and str(vector.value_type) == "float"


def test_parquet_rows_without_embeddings_are_held_until_enough_show_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ParquetSink, "ROW_GROUP", 2)
    monkeypatch.setattr(files, "HOLD_ROWS", 6)
    target = tmp_path / "out.parquet"
    writer = open_file_sink(str(target))
    writer.write([annotated(f"file:///p/{i}.jpg", dim=None) for i in range(5)])
    assert not writer.partial.exists()  # a later record may still show the vector's length
    writer.write([annotated(f"file:///p/{i}.jpg", dim=None) for i in (5, 6)])
    assert writer.partial.exists()  # HOLD_ROWS of them (and more) without one: a plain list it is
    writer.write([annotated("file:///p/7.jpg", dim=3)])  # a plain list takes any length
    writer.close()
    records = read_records(target)
    vector = pq.ParquetFile(target).schema_arrow.field("embedding").type.field("vector").type
    assert len(records) == 8 and records[7].embedding is not None and records[7].embedding.dim == 3
    assert pa.types.is_list(vector)  # a plain list, not a fixed-size one


def test_a_short_parquet_file_without_embeddings_is_written_at_close(tmp_path: Path) -> None:
    records = [annotated("file:///p/a.jpg", dim=None), failed("file:///p/b.jpg")]
    assert written(tmp_path / "out.parquet", records) == records
    assert written(tmp_path / "empty.parquet") == []


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_embedding_column_has_the_configured_type_and_is_byte_stream_split(tmp_path: Path, dtype: str) -> None:
    target = tmp_path / "out.parquet"
    record = annotated("file:///p/a.jpg", dim=8)
    with ParquetSink(target, keep_existing=False, embedding_dtype=dtype) as writer:
        writer.write([record])
    meta = pq.ParquetFile(target)
    vector = meta.schema_arrow.field("embedding").type.field("vector").type
    assert str(vector.value_type) == {"float32": "float", "float16": "halffloat"}[dtype]
    columns = {meta.metadata.row_group(0).column(i).path_in_schema: i for i in range(meta.metadata.num_columns)}
    encodings = meta.metadata.row_group(0).column(columns[VECTOR_COLUMN]).encodings
    assert "BYTE_STREAM_SPLIT" in encodings
    for name in ("caption.text", "signature"):  # the other columns, before and after the vector's
        column = meta.metadata.row_group(0).column(columns[name])
        assert column.compression == "ZSTD" and any("DICTIONARY" in e for e in column.encodings)
    back = read_records(target)[0].embedding
    assert back is not None and np.allclose(back.array(), record.embedding.array(), atol=1e-3)  # type: ignore[union-attr]


@pytest.mark.parametrize("named", ["jsonl", "JSONL", "parquet", "Parquet"])
def test_a_chunk_document_round_trips_as_one_object_per_chunk(named: str) -> None:
    fmt = split_format(f"file:///d/?format={named}")[1]  # as a sink's URL names it
    records = [annotated("file:///p/a.jpg", seed=1), failed("file:///p/b.jpg"), annotated("file:///p/c.jpg", dim=None)]
    assert decode_records(encode_records(records, fmt), fmt) == records
    assert decode_records(encode_records([], fmt), fmt) == []


def test_a_parquet_chunk_document_takes_the_configured_embedding_type() -> None:
    document = encode_records([annotated("file:///p/a.jpg", dim=8)], "parquet", embedding_dtype="float16")
    table = pq.read_table(pa.BufferReader(document))
    vector = table.schema.field("embedding").type.field("vector").type
    assert (vector.list_size, str(vector.value_type)) == (8, "halffloat")


@pytest.mark.parametrize("fmt", ["csv", "xml"])  # sorting before and after the known ones
def test_an_unknown_chunk_format_is_refused(fmt: str) -> None:
    with pytest.raises(ValueError, match=f"unknown record format '{fmt}'"):
        encode_records([failed("file:///p/a.jpg")], fmt)


def test_columnar_tables_are_written_as_they_are_under_the_first_tables_schema(tmp_path: Path) -> None:
    first = pa.table({"uri": ["file:///p/a.jpg"], "score": [0.5]})
    second = pa.table({"uri": ["file:///p/b.jpg", "file:///p/c.jpg"], "score": [0.25, 0.125]})
    target = tmp_path / "retagged.parquet"
    with ParquetSink(target, keep_existing=False) as writer:
        writer.write_table(first)
        writer.write_table(second)
    assert pq.read_table(target).to_pydict() == {
        "uri": ["file:///p/a.jpg", "file:///p/b.jpg", "file:///p/c.jpg"],
        "score": [0.5, 0.25, 0.125],
    }


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 50])
@pytest.mark.parametrize("ending", [b"\n", b""])
def test_a_jsonl_file_s_line_ranges_hold_every_line_once_in_order(tmp_path: Path, parts: int, ending: bytes) -> None:
    # lines of uneven length, a blank one among them, the last with or without its newline
    lines = [b'{"uri": "s3://b/%d.jpg", "pad": "%s"}' % (i, b"x" * (i * 37 % 300)) for i in range(20)]
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n".join([*lines[:5], b"   ", *lines[5:]]) + ending)
    ranges = line_ranges(str(path), parts)
    assert 1 <= len(ranges) <= parts and ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(stop == start for (_, stop), (start, _) in itertools.pairwise(ranges))  # no gap, no overlap
    read = [row["uri"] for lines_ in ranges for batch in json_rows(str(path), 3, lines_) for row in batch]
    assert read == [f"s3://b/{i}.jpg" for i in range(20)]


def test_a_bad_line_read_from_a_later_range_is_named_by_its_line_in_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"".join(b'{"uri": "s3://b/%d.jpg"}\n' % i for i in range(40)) + b"not json\n")
    (_, _), (start, stop) = line_ranges(str(path), 2)
    with pytest.raises(UserError, match="line 41 is not JSON"):
        list(json_rows(str(path), 8, (start, stop)))
