"""Dedup's marks written back into the store (`imagemill dedup --write-back`): each compared image's
group and whether it is the one kept, as the record's `dedup` field, so `export --where "not
duplicate"` reads the store alone.

PostgreSQL rows are updated in place (their JSON document, one transaction); a .jsonl or .parquet
file is rewritten beside itself and moved into place, as JSON objects or Arrow columns (no record
object built). An earlier run's marks are replaced: an image compared no more keeps none.
"""

from collections.abc import Iterable
from pathlib import Path

from imagemill.core.errors import UserError
from imagemill.core.redaction import redact_url
from imagemill.core.sinks.files import (
    DEDUP_TYPE,
    JsonlSink,
    ParquetSink,
    json_rows,
    parquet_batches,
    record_file_kind,
)
from imagemill.records.near_duplicates import DuplicateGroup, Embeddings, NewDuplicate

# (uri, etag) of an image version -> (its group: the representative's uri or None, representative)
Marks = dict[tuple[str, str | None], tuple[str | None, bool]]
ROWS = 4096  # JSON objects per batch
COLUMNS = 65_536  # Arrow rows per batch


def check_writable(source: str) -> None:
    """UserError (one line), before any record is read, unless marks can be written back to `source`."""
    if source.startswith(("postgresql://", "postgres://")):
        return
    if "://" not in source and record_file_kind(Path(source)) in ("jsonl", "parquet"):
        return
    raise UserError(
        f"--write-back: marks go back to a .jsonl or .parquet file or a postgresql:// store, not {redact_url(source)}"
    )


def group_marks(embeddings: Embeddings, groups: Iterable[DuplicateGroup]) -> Marks:
    """Every compared image: alone (no group, kept), or its group's representative, or a duplicate."""
    marks: Marks = {(image.uri, image.etag): (None, True) for image in embeddings.images}
    for found in groups:
        for member in found.members:
            marks[member.uri, member.etag] = (found.representative, member.uri == found.representative)
    return marks


def against_marks(new: Embeddings, matched: Iterable[NewDuplicate]) -> Marks:
    """Every compared new image: alone, or a duplicate in the group of the corpus image it is most like."""
    marks: Marks = {(image.uri, image.etag): (None, True) for image in new.images}
    for found in matched:
        marks[found.uri, found.etag] = (found.matches[0].uri, False)
    return marks


def write_back(source: str, marks: Marks, threshold: float) -> int:
    """`marks` into the records of `source` (`check_writable`'s kinds); how many records hold one."""
    check_writable(source)
    if source.startswith(("postgresql://", "postgres://")):
        from imagemill.core.sinks.postgres import PostgresSink  # psycopg, for this store only

        sink = PostgresSink(source)
        try:
            rows = ((uri, etag, group, kept) for (uri, etag), (group, kept) in marks.items())
            return sink.write_dedup_marks(rows, threshold)
        finally:
            sink.close()
    if record_file_kind(Path(source)) == "parquet":
        return _parquet(source, marks, threshold)
    return _jsonl(source, marks, threshold)


def _jsonl(source: str, marks: Marks, threshold: float) -> int:
    batches = json_rows(source, ROWS)  # checked before the file is rewritten
    sink = JsonlSink(Path(source), keep_existing=False)
    marked = 0
    try:
        for batch in batches:
            for row in batch:
                mark = marks.get((row.get("uri", ""), row.get("etag")))
                row.pop("dedup", None)
                if mark is not None:
                    row["dedup"] = {"group": mark[0], "representative": mark[1], "threshold": threshold}
                    marked += 1
            sink.write_rows(batch)
    except BaseException:
        sink.abort()  # the file stays as it was
        raise
    sink.close()
    return marked


def _parquet(source: str, marks: Marks, threshold: float) -> int:
    import pyarrow as pa  # through the file reader already: only a Parquet file needs it here

    batches = parquet_batches(source, COLUMNS)  # checked before the file is rewritten
    sink = ParquetSink(Path(source), keep_existing=False)
    marked = 0
    try:
        for batch in batches:
            table = pa.Table.from_batches([batch])
            keys = zip(batch.column("uri").to_pylist(), batch.column("etag").to_pylist(), strict=True)
            found = [marks.get(key) for key in keys]
            missing = pa.array([mark is None for mark in found])
            column = pa.StructArray.from_arrays(
                [
                    pa.array([None if mark is None else mark[0] for mark in found], pa.string()),
                    pa.array([None if mark is None else mark[1] for mark in found], pa.bool_()),
                    pa.array([None if mark is None else threshold for mark in found], pa.float64()),
                ],
                fields=list(DEDUP_TYPE),
                mask=missing,
            )
            marked += len(found) - sum(mark is None for mark in found)
            if "dedup" in table.schema.names:
                index = table.schema.get_field_index("dedup")
                table = table.set_column(index, pa.field("dedup", DEDUP_TYPE), column)
            else:
                table = table.append_column(pa.field("dedup", DEDUP_TYPE), column)
            sink.write_table(table)
    except BaseException:
        sink.abort()
        raise
    sink.close()
    return marked
