"""Manifests as people write them: every line becomes one reference, a bad line one `bad_reference`.

Encodings (UTF-8 with or without a BOM, UTF-16 with one), spreadsheet CSV, compression (gzip,
zstd), Parquet, manifests on S3, `--strict`; property-based tests (hypothesis) for the parsers and
for sink URL options. In-process where possible; one CLI run each for the summary and `--strict`.
"""

import codecs
import gzip
import io
import json
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from imagemill.core.errors import ErrorKind, ImageError, SourceError, UserError
from imagemill.core.images import ObjectReader, file_uri
from imagemill.core.jobs import JobRegistry, JobState
from imagemill.core.schemas import ChunkMessage, ImageRef
from imagemill.core.settings import Settings
from imagemill.core.sinks import Sink, open_sink
from imagemill.core.sinks.files import read_records
from imagemill.core.sinks.options import split_options
from imagemill.core.tasks import Task
from imagemill.pipeline.sources import S3Source, manifests, open_source
from imagemill.pipeline.sources.manifest_text import MAX_LINE_BYTES, READ_SIZE, lines
from imagemill.pipeline.sources.manifests import MAX_RECORD_LINES, ManifestSource, manifest_kind
from tests.fixtures.cli import run_cli
from tests.fixtures.distributed import job_id_of, rows, upload_photos
from tests.fixtures.images import photo_jpeg
from tests.fixtures.s3 import s3_client
from tests.fixtures.workers import start_worker

BAD = re.compile(r"^manifest:(?P<name>[^#]+)#L(?P<line>\d+)$")
# as many examples as keep this module fast on a 2-core machine; the counts are in the README
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def listed(path: Path | str) -> list[tuple[int, ImageRef]]:
    return list(ManifestSource(path).numbered())


def line_uri(manifest: Path | str, line: int) -> str:
    """What a bad line is named: `manifest:`, the manifest whole (an s3:// URI, or a file's file:// URI), the line."""
    whole = manifest if isinstance(manifest, str) and manifest.startswith("s3://") else file_uri(Path(manifest))
    return f"manifest:{whole}#L{line}"


def outcome(ref: ImageRef) -> str:
    """`ok`, or the reason of a bad line."""
    return "ok" if ref.problem is None else ref.problem


def compress(data: bytes, compression: str) -> bytes:
    if compression == ".gz":
        return gzip.compress(data)
    if compression == ".zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


# ---------------------------------------------------------------------------------------------
# each format: good and bad lines mixed, every line one reference


MIXED_LINES = [  # (line, reason of a bad line, or None)
    ("s3://photos/a.jpg", None),
    ("http://example.com/b.jpg", "http: scheme is not one imagemill reads"),
    ("", None),  # blank: no entry
    ("s3://", "no bucket"),
    ("local/c.jpg", None),
    ("gs://bucket/d.jpg", "gs: scheme"),
    ("s3://photos/e f.jpg", None),
]


def write_mixed(path: Path, fmt: str, compression: str) -> list[tuple[int, str]]:
    """MIXED_LINES plus one undecodable line, as `fmt`; the expected (line, outcome) of each entry."""
    lines: list[bytes] = []
    expected: list[tuple[int, str]] = []
    if fmt == ".csv":
        lines.append(b"id;URI;note")
    for i, (uri, reason) in enumerate(MIXED_LINES):
        if fmt == ".jsonl":
            text = json.dumps({"uri": uri, "id": i}) if uri else ""
        elif fmt == ".csv":
            text = f'{i};"{uri}";"a; b"' if uri else ""
        else:
            text = uri
        lines.append(text.encode())
        if text:
            expected.append((len(lines), reason or "ok"))
    lines.append(b"\xff\xfe broken")  # not UTF-8, whatever the format
    expected.append((len(lines), "not UTF-8 text"))
    lines.append(b'{"no": "uri"}' if fmt == ".jsonl" else b"7;;" if fmt == ".csv" else b"# a comment")
    if fmt != ".txt":
        expected.append((len(lines), "no uri"))
    path.write_bytes(compress(b"\r\n".join(lines) + b"\r\n", compression))
    return expected


@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
@pytest.mark.parametrize("fmt", [".txt", ".jsonl", ".csv"])
def test_every_line_is_one_reference_and_a_bad_line_says_why(tmp_path: Path, fmt: str, compression: str) -> None:
    path = tmp_path / f"list{fmt}{compression}"
    expected = write_mixed(path, fmt, compression)
    got = listed(path)
    assert [line for line, _ in got] == [line for line, _ in expected]
    for (line, ref), (_, want) in zip(got, expected, strict=True):
        if want == "ok":
            assert ref.problem is None and ref.uri.startswith(("s3://", "file://")), (line, ref)
        else:
            assert ref.uri == line_uri(path, line) and want in outcome(ref), (line, ref)
    good = [ref.uri for _, ref in got if ref.problem is None]
    assert good == ["s3://photos/a.jpg", file_uri(tmp_path / "local/c.jpg"), "s3://photos/e f.jpg"]


def test_a_spreadsheet_csv_with_bom_semicolons_quotes_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    rows = ['Name;"Uri";Size', '"holiday; beach";"s3://b/x;y.jpg";12', '"multi\r\nline";s3://b/z.jpg;', "a;;3"]
    path.write_bytes(codecs.BOM_UTF8 + "\r\n".join(rows).encode() + b"\r\n")
    got = listed(path)
    assert [(line, ref.uri, ref.size, ref.problem) for line, ref in got] == [
        (2, "s3://b/x;y.jpg", 12, None),
        (3, "s3://b/z.jpg", None, None),  # a quoted field spans lines 3 and 4: one entry, line 3
        (5, line_uri(path, 5), None, "no uri on this line"),
    ]


def test_a_csv_without_header_or_with_one_column_of_any_name(tmp_path: Path) -> None:
    (tmp_path / "plain.csv").write_text("s3://b/1.jpg\ns3://b/2.jpg\n")
    (tmp_path / "paths.csv").write_text("photo.jpg,x\nother.png,y\n")
    (tmp_path / "named.csv").write_text("Image Path\ns3://b/3.jpg\n")
    (tmp_path / "wide.csv").write_text("name,size\na,1\n")
    assert [r.uri for _, r in listed(tmp_path / "plain.csv")] == ["s3://b/1.jpg", "s3://b/2.jpg"]
    assert [r.uri for _, r in listed(tmp_path / "paths.csv")] == [
        file_uri(tmp_path / "photo.jpg"),
        file_uri(tmp_path / "other.png"),
    ]
    assert [(line, r.uri) for line, r in listed(tmp_path / "named.csv")] == [(2, "s3://b/3.jpg")]
    with pytest.raises(SourceError, match=r"no 'uri' column \(columns: \['name', 'size'\]\)"):
        listed(tmp_path / "wide.csv")


def test_utf16_with_its_bom_and_an_undecodable_line(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    body = "s3://b/é.jpg\r\n".encode("utf-16-le") + b"\x00\xd8\n\x00" + "s3://b/ü.jpg\n".encode("utf-16-le")
    path.write_bytes(codecs.BOM_UTF16_LE + body)
    got = [(line, ref.uri, outcome(ref)) for line, ref in listed(path)]
    assert got[0] == (1, "s3://b/é.jpg", "ok") and got[2] == (3, "s3://b/ü.jpg", "ok")
    assert got[1][:2] == (2, line_uri(path, 2)) and "not UTF-16 text" in got[1][2]
    path.write_bytes(codecs.BOM_UTF16_BE + "s3://b/big.jpg\n".encode("utf-16-be"))
    assert [r.uri for _, r in listed(path)] == ["s3://b/big.jpg"]


@pytest.mark.parametrize("compression", [".gz", ".zst"])
def test_a_cut_short_compressed_manifest_keeps_its_lines_and_ends_in_one_bad_line(
    tmp_path: Path, compression: str
) -> None:
    path = tmp_path / f"list.txt{compression}"
    whole = compress("".join(f"s3://b/{i:05}.jpg\n" for i in range(20000)).encode(), compression)
    path.write_bytes(whole[: len(whole) * 3 // 4])
    got = listed(path)
    *good, (last_line, last) = got
    assert good and all(ref.problem is None for _, ref in good) and len(good) < 20000
    assert last_line == len(good) + 1 and last.problem and "cannot be read past line" in last.problem


def test_an_unreadable_manifest_is_a_source_error_not_a_bad_line(tmp_path: Path) -> None:
    (tmp_path / "list.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(SourceError, match="cannot read the manifest"):
        listed(tmp_path / "list.jsonl.gz")
    (tmp_path / "list.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(SourceError, match="not a readable Parquet file"):
        listed(tmp_path / "list.parquet")


def test_a_line_too_long_to_be_a_uri_is_one_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_bytes(b"s3://b/1.jpg\n" + b"x" * (MAX_LINE_BYTES + 300_000) + b"\ns3://b/2.jpg")
    got = [(line, outcome(ref)) for line, ref in listed(path)]
    assert got == [(1, "ok"), (2, f"the line is longer than {MAX_LINE_BYTES:,} bytes"), (3, "ok")]


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("   ", "empty uri"),
        ("https://example.com/a.jpg", "https: scheme is not one imagemill reads"),
        ("s3:bucket/a.jpg", "not an s3:// URI"),
        ("s3:///a.jpg", "no bucket"),
        ("s3://bucket", "names a bucket or folder"),
        ("s3://bucket/folder/", "names a bucket or folder"),
        ("s3://no such bucket!/a.jpg", "not an S3 bucket name"),
        ("://host/a.jpg", "not a URI"),
        ("file://otherhost/a.jpg", "not host 'otherhost'"),
        ("file://", "no path"),
        ("a\x00b.jpg", "control character"),
        ("\ud800.jpg", "not valid Unicode"),
        ("s3://b/" + "k" * 5000, "characters long"),
    ],
)
def test_uris_imagemill_cannot_read_are_bad_lines(tmp_path: Path, uri: str, reason: str) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps({"uri": uri}) + "\n")  # JSON escapes carry NULs and lone surrogates
    [(line, ref)] = listed(path)
    assert line == 1 and ref.uri == line_uri(path, 1) and reason in outcome(ref)
    # the reason quotes the value escaped: a record can always be written
    assert ref.problem is not None and not re.search(r"[\x00-\x1f\ud800-\udfff]", ref.problem)


def test_entries_keep_their_etag_and_size_and_bad_ones_say_which_field(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"uri": "s3://b/a.jpg", "etag": "e1", "size": 10}\n{"uri": "s3://b/b.jpg", "size": -1}\n')
    [(_, good), (_, bad)] = listed(path)
    assert (good.etag, good.size) == ("e1", 10)
    assert bad.problem and bad.problem.startswith("bad size")


def test_parquet_manifest_is_read_by_row_groups(tmp_path: Path) -> None:
    path = tmp_path / "list.parquet"
    uris = [f"s3://b/{i}.jpg" for i in range(25)]
    uris[3], uris[17] = None, "ftp://x/y.jpg"  # type: ignore[call-overload]
    table = pa.table({"URI": uris, "size": list(range(25)), "other": ["x"] * 25})
    pq.write_table(table, path, row_group_size=10)
    got = listed(path)
    assert len(got) == 25 and [line for line, _ in got] == list(range(1, 26))
    assert [line for line, ref in got if ref.problem] == [4, 18]
    assert got[4][1].uri == "s3://b/4.jpg" and got[4][1].size == 4


def bad_line_number(ref: ImageRef) -> int:
    """The line (or row) number a bad entry's uri names: `manifest:…#L<n>`."""
    found = re.search(r"#L(\d+)$", ref.uri)
    assert ref.problem and found, ref
    return int(found.group(1))


def test_a_csv_row_the_reader_refuses_is_a_bad_line_at_its_own_line_number(tmp_path: Path) -> None:
    """A field over the csv module's size limit makes the reader raise; the bad line is the row's
    own line, counted past a blank line and a quoted field over two lines, and the rows after it follow."""
    path = tmp_path / "list.csv"
    rows = ["", "uri;note", 's3://b/1.jpg;"two', 'lines"', "s3://b/2.jpg;" + "x" * 200_000, "s3://b/3.jpg;ok"]
    path.write_text("\n".join(rows) + "\n")
    got = listed(path)
    assert [(line, outcome(ref).partition(" (")[0]) for line, ref in got] == [
        (3, "ok"),
        (5, "not CSV: field larger than field limit"),
        (6, "ok"),
    ]
    assert bad_line_number(got[1][1]) == 5
    assert [ref.uri for _, ref in got[::2]] == ["s3://b/1.jpg", "s3://b/3.jpg"]


def test_a_csv_without_a_header_goes_on_after_a_row_the_reader_refuses(tmp_path: Path) -> None:
    """Without a header the first row is data; a refused row later costs that row alone, not the rest
    (a reader chained behind the first row once ended with the error)."""
    path = tmp_path / "list.csv"
    rows = ["s3://b/1.jpg,a", "s3://b/2.jpg," + "x" * 200_000, "s3://b/3.jpg,c", "s3://b/4.jpg,d"]
    path.write_text("\n".join(rows) + "\n")
    got = listed(path)
    assert [line for line, _ in got] == [1, 2, 3, 4]
    assert bad_line_number(got[1][1]) == 2
    assert [ref.uri for _, ref in got[2:]] == ["s3://b/3.jpg", "s3://b/4.jpg"]


def test_a_parquet_manifest_that_fails_partway_names_the_first_row_it_could_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = 16
    monkeypatch.setattr(manifests, "PARQUET_BATCH_ROWS", batch)  # a small batch keeps the file small
    path = tmp_path / "list.parquet"
    buffer = io.BytesIO()
    table = pa.table({"uri": [f"s3://b/{i:03}.jpg" for i in range(3 * batch)]})
    # the first row group is one whole batch: read and listed before the second one is reached
    pq.write_table(table, buffer, row_group_size=batch, compression="none", use_dictionary=False)
    data = bytearray(buffer.getvalue())
    second = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(1).column(0)
    data[second.data_page_offset : second.data_page_offset + 8] = b"\xff" * 8  # its page header, unreadable
    path.write_bytes(bytes(data))
    *good, (line, last) = listed(path)
    assert [(n, ref.uri) for n, ref in good] == [(i + 1, f"s3://b/{i:03}.jpg") for i in range(batch)]
    assert line == bad_line_number(last) == batch + 1
    assert f"cannot be read past row {batch}:" in (last.problem or "")


def test_strict_check_names_the_first_bad_line_or_counts_the_entries(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"uri": "s3://b/a.jpg"}\n\n{"uri": "s3://b/b.jpg"}\n')
    assert ManifestSource(path).check() == 2
    path.write_text('{"uri": "s3://b/a.jpg"}\n{"id": 2}\nnot json\n')
    with pytest.raises(SourceError, match=r"^\S+list.jsonl line 2: no uri on") as raised:
        ManifestSource(path).check()
    assert "\n" not in str(raised.value)


def test_a_bad_reference_is_never_fetched(tmp_path: Path) -> None:
    ref = ImageRef(uri="manifest:list.txt#L3", problem="the gs: scheme is not one imagemill reads")
    with pytest.raises(ImageError) as raised:
        ObjectReader(Settings()).read(ref)
    assert raised.value.kind == ErrorKind.BAD_REFERENCE and raised.value.message == ref.problem


def test_a_good_ref_travels_in_a_chunk_without_a_problem_field() -> None:
    """Workers from before bad references refuse unknown fields: a good ref's message is unchanged."""
    refs = [ImageRef(uri="s3://b/a.jpg"), ImageRef(uri="manifest:list.txt#L2", problem="empty uri")]
    message = ChunkMessage(job_id="j1", chunk_id="j1/000000", tasks=(Task.MODERATION,), refs=refs)
    sent = message.model_dump(mode="json")
    assert sent["refs"] == [
        {"uri": "s3://b/a.jpg", "etag": None, "size": None},
        {"uri": "manifest:list.txt#L2", "etag": None, "size": None, "problem": "empty uri"},
    ]
    assert ChunkMessage.model_validate(sent) == message


def test_manifest_names_are_recognised_by_suffix() -> None:
    assert manifest_kind("a/b/today.JSONL.GZ") == (".jsonl", ".gz")
    assert manifest_kind("x.csv.zst") == (".csv", ".zst")
    assert manifest_kind("x.parquet") == (".parquet", None)
    assert manifest_kind("x.parquet.gz") is None and manifest_kind("x.jpg") is None
    assert manifest_kind("photos/2026/") is None


# ---------------------------------------------------------------------------------------------
# a stray quote, CR line endings, a cut anywhere, each manifest named whole (issue 23)

STRAY_ROWS = MAX_RECORD_LINES * 2 + 500  # a stray quote's field would swallow past the bound, then more
STRAY_AT = 7  # the row with the stray quote: line 9, after the header


def stray_csv(kind: str) -> tuple[bytes, str]:
    """A CSV of STRAY_ROWS rows, one of them broken as `kind` says; what its bad line's reason holds."""
    rows = [f"{i},s3://b/{i:05}.jpg,note {i}" for i in range(STRAY_ROWS)]
    reason = "still open 1,000 lines on"
    if kind == "an unquoted file":  # only the bound can end it
        rows[STRAY_AT] = f'{STRAY_AT},"s3://b/{STRAY_AT:05}.jpg,note'
    elif kind == "a quoted file":  # the next quote closes the stray one, with text after it
        rows = [f'{i},"s3://b/{i:05}.jpg","note {i}"' for i in range(STRAY_ROWS)]
        rows[STRAY_AT] = f'{STRAY_AT},"s3://b/{STRAY_AT:05}.jpg,note {STRAY_AT}'
        reason = "not CSV: ',' expected after '\"'"
    elif kind == "a quoted note column":  # the uri is whole; the note swallows the lines after it
        rows[STRAY_AT] = f'{STRAY_AT},s3://b/{STRAY_AT:05}.jpg,"note'
    elif kind == "a quote closing at a later line's end":  # a row that closes, with lines in its uri
        rows[STRAY_AT] = f'{STRAY_AT},"s3://b/{STRAY_AT:05}.jpg'
        rows[STRAY_AT + 3] += '"'
        reason = f"runs on to line {STRAY_AT + 5}, putting a line break in the uri"
    elif kind == "the row before the last":  # still open at the end of the file
        rows[-2] = f'{len(rows) - 2},"s3://b/{len(rows) - 2:05}.jpg'
        reason = "not CSV: unexpected end of data"
    elif kind == "a field over the csv module's limit":
        rows[STRAY_AT] = f"{STRAY_AT},s3://b/{'x' * 140_000}.jpg"
        reason = "field larger than field limit"
    return ("id,uri,note\n" + "\n".join(rows) + "\n").encode(), reason


@pytest.mark.parametrize(
    "kind",
    [
        "an unquoted file",
        "a quoted file",
        "a quoted note column",
        "a quote closing at a later line's end",
        "the row before the last",
        "a field over the csv module's limit",
    ],
)
def test_a_stray_quote_is_one_bad_line_and_every_other_row_is_read(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "rows.csv"
    data, reason = stray_csv(kind)
    path.write_bytes(data)
    got = listed(path)
    bad_line = STRAY_ROWS if kind == "the row before the last" else STRAY_AT + 2
    assert [line for line, _ in got] == list(range(2, STRAY_ROWS + 2))  # every row one entry, none swallowed
    assert [(line, ref.uri) for line, ref in got if ref.problem] == [(bad_line, line_uri(path, bad_line))]
    assert reason in outcome(dict(got)[bad_line])
    with pytest.raises(SourceError, match=rf"rows.csv line {bad_line}: .*--strict stops at the first bad line$"):
        ManifestSource(path).check()


def test_a_quoted_field_holds_line_breaks_up_to_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "notes.csv"
    for spans, fits in ((MAX_RECORD_LINES, True), (MAX_RECORD_LINES + 1, False)):
        note = "\n".join(f"note line {i}" for i in range(spans))
        path.write_text(f'uri,note\ns3://b/a.jpg,"{note}"\ns3://b/z.jpg,end\n')
        got = [(line, ref.uri if ref.problem is None else "bad") for line, ref in listed(path)]
        last = 2 + spans
        if fits:  # one row over `spans` lines
            assert got == [(2, "s3://b/a.jpg"), (last, "s3://b/z.jpg")]
        else:  # its first line is bad; each line it spanned is read again as a row of its own
            assert [line for line, _ in got] == list(range(2, last + 1))
            assert got[0] == (2, "bad") and got[-1] == (last, "s3://b/z.jpg")


def test_a_row_on_one_line_is_read_as_leniently_as_before(tmp_path: Path) -> None:
    """Only rows over several lines must be well formed: on one line, text after a closing quote, or a
    quote left open on the last line, is read as the csv module reads it by default."""
    path = tmp_path / "rows.csv"
    path.write_text('uri,note\n"s3://b/a.jpg" ,x\ns3://b/b.jpg,y\n"s3://b/c.jpg')
    assert [(line, ref.uri) for line, ref in listed(path)] == [
        (2, "s3://b/a.jpg"),
        (3, "s3://b/b.jpg"),
        (4, "s3://b/c.jpg"),
    ]


def test_a_broken_first_row_is_one_bad_line_and_the_next_row_is_read_as_the_first(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text('id,"uri\n' + "".join(f"{i},s3://b/{i}.jpg\n" for i in range(3)))
    got = [(line, ref.uri if ref.problem is None else outcome(ref)) for line, ref in listed(path)]
    assert got[0] == (1, "not CSV: unexpected end of data")  # still open at the end, 3 lines on
    assert got[1:] == [(2, "s3://b/0.jpg"), (3, "s3://b/1.jpg"), (4, "s3://b/2.jpg")]


@pytest.mark.parametrize("compression", ["", ".gz"])
@pytest.mark.parametrize("fmt", [".txt", ".jsonl", ".csv"])
def test_cr_line_endings_read_like_the_others(tmp_path: Path, fmt: str, compression: str) -> None:
    """Excel's "CSV (Macintosh)" and classic Mac OS end lines with a lone CR."""
    (tmp_path / "crlf").mkdir()
    (tmp_path / "cr").mkdir()
    crlf, cr = tmp_path / "crlf" / f"list{fmt}", tmp_path / "cr" / f"list{fmt}{compression}"
    expected = write_mixed(crlf, fmt, "")
    cr.write_bytes(compress(crlf.read_bytes().replace(b"\r\n", b"\r"), compression))
    got = listed(cr)
    assert [(line, outcome(ref)[:40]) for line, ref in got] == [(line, outcome(ref)[:40]) for line, ref in listed(crlf)]
    assert [line for line, _ in got] == [line for line, _ in expected]


def test_cr_lines_in_utf16_and_across_blocks() -> None:
    """A CR LF split between two blocks is one line break; UTF-16 breaks fall on code units."""
    first = b"s3://b/a.jpg\r"  # the first line break is a lone CR: CR, LF and CR LF all end lines
    pad = b"s3://b/" + b"p" * (READ_SIZE - len(first) - len(b"s3://b/") - 1)
    blocks = [first + pad + b"\r", b"\ns3://b/c.jpg\ns3://b/d.jpg\r"]
    assert [(line.number, line.text) for line in lines(iter(blocks))] == [
        (1, "s3://b/a.jpg"),
        (2, pad.decode()),
        (3, "s3://b/c.jpg"),
        (4, "s3://b/d.jpg"),
    ]
    utf16 = codecs.BOM_UTF16_LE + "s3://b/é.jpg\r\u0d0a.jpg\r\ns3://b/ü.jpg\r".encode("utf-16-le")
    # U+0D0A is the bytes 0A 0D: neither half is a line break off a code unit boundary
    assert [line.text for line in lines(iter([utf16[:7], utf16[7:]]))] == ["s3://b/é.jpg", "\u0d0a.jpg", "s3://b/ü.jpg"]
    # a file whose first line break is an LF keeps a stray CR inside a later line (a bad uri, not two lines)
    assert [line.text for line in lines(iter([b"s3://b/c.jpg\ns3://b/a\r.jpg\n"]))] == [
        "s3://b/c.jpg",
        "s3://b/a\r.jpg",
    ]


def decompressible(data: bytes, compression: str) -> bytes:
    """As much of a cut-short stream as its library decompresses."""
    if compression == ".gz":
        return zlib.decompressobj(wbits=31).decompress(data)
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


# lines in one 64 KiB block, and in several (zstd's blocks hold up to 128 KiB of content, compressed whole)
@pytest.mark.parametrize(("compression", "count"), [(".gz", 300), (".gz", 8000), (".zst", 300), (".zst", 20_000)])
def test_a_compressed_manifest_cut_anywhere_keeps_every_whole_line_before_the_cut(
    tmp_path: Path, compression: str, count: int
) -> None:
    path = tmp_path / f"list.txt{compression}"
    whole = compress("".join(f"s3://b/{i:05}.jpg\n" for i in range(count)).encode(), compression)
    kept_some = False
    for cut in sorted({len(whole) * share // 8 for share in (1, 3, 5, 7)}):
        path.write_bytes(whole[:cut])
        before = decompressible(whole[:cut], compression)
        if not before:  # nothing of the content decompresses: the file is unreadable, as a .gz that is none
            with pytest.raises(SourceError, match="cannot read the manifest"):
                listed(path)
            continue
        whole_lines = before.count(b"\n")
        got = listed(path)
        assert [(line, ref.problem is None) for line, ref in got[:-1]] == [(n, True) for n in range(1, whole_lines + 1)]
        last_line, last = got[-1]
        assert (
            last_line == whole_lines + 1 and last.problem and f"cannot be read past line {whole_lines}" in last.problem
        )
        kept_some = kept_some or whole_lines > 0
    assert kept_some or (compression == ".zst" and count == 300)  # zstd decompresses whole blocks (128 KiB)


def test_a_bad_line_names_its_manifest_whole_the_same_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for folder in ("a", "c"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "today.jsonl").write_text('{"uri": "x.jpg"}\n{"url": "y.jpg"}\n')

    def bad_uris(spec: str) -> list[str]:
        return [ref.uri for ref in open_source(spec, Settings()).refs() if ref.problem]

    a, c = bad_uris(str(tmp_path / "a" / "today.jsonl")), bad_uris(str(tmp_path / "c" / "today.jsonl"))
    assert a == [f"manifest:{(tmp_path / 'a' / 'today.jsonl').as_uri()}#L2"] and c != a
    monkeypatch.chdir(tmp_path)
    assert bad_uris("a/today.jsonl") == a
    monkeypatch.chdir(tmp_path / "a")
    assert bad_uris("today.jsonl") == bad_uris("./today.jsonl") == a


def test_a_manifest_named_too_long_for_its_lines_records_is_refused_before_reading() -> None:
    """A bad line's uri holds the manifest's whole name: past what a record's uri may hold, say so at once."""
    with pytest.raises(SourceError, match=r"too long to name its lines' records by \(4,1\d\d characters as a URI\)"):
        ManifestSource("s3://b/" + "k" * 4100 + ".csv")
    ManifestSource("s3://b/" + "k" * 1000 + ".csv")  # S3's longest key (1,024 bytes) is fine


def test_two_manifests_of_one_name_on_s3_name_their_bad_lines_apart(s3_env: str, bucket: str) -> None:
    client = s3_client(s3_env)
    for prefix in ("a", "c"):
        client.put_object(Bucket=bucket, Key=f"{prefix}/today.jsonl", Body=b'{"uri": "x.jpg"}\n{"url": "y.jpg"}\n')
    found = {
        prefix: [
            ref.uri for ref in open_source(f"s3://{bucket}/{prefix}/today.jsonl", Settings()).refs() if ref.problem
        ]
        for prefix in ("a", "c")
    }
    assert found == {prefix: [f"manifest:s3://{bucket}/{prefix}/today.jsonl#L2"] for prefix in ("a", "c")}


# ---------------------------------------------------------------------------------------------
# manifests on S3


def test_a_key_named_like_a_manifest_is_one_and_a_prefix_is_a_listing(s3_env: str, bucket: str, tmp_path: Path) -> None:
    client = s3_client(s3_env)
    client.put_object(Bucket=bucket, Key="lists/today.jsonl.gz", Body=gzip.compress(b'{"uri": "a.jpg"}\n{"x": 1}\n'))
    buffer = io.BytesIO()
    pq.write_table(pa.table({"uri": [f"s3://{bucket}/p/{i}.jpg" for i in range(3)]}), buffer)
    client.put_object(Bucket=bucket, Key="lists/rows.parquet", Body=buffer.getvalue())
    settings_ = Settings()
    source = open_source(f"s3://{bucket}/lists/today.jsonl.gz", settings_)
    assert isinstance(source, ManifestSource)
    assert [(r.uri, r.problem) for r in source.refs()] == [
        (f"s3://{bucket}/lists/a.jpg", None),  # relative to the manifest's own prefix
        (f"manifest:s3://{bucket}/lists/today.jsonl.gz#L2", "no uri on this line"),
    ]
    rows = open_source(f"s3://{bucket}/lists/rows.parquet", settings_)
    assert [r.uri for r in rows.refs()] == [f"s3://{bucket}/p/{i}.jpg" for i in range(3)]
    assert isinstance(open_source(f"s3://{bucket}/lists/", settings_), S3Source)
    with pytest.raises(SourceError, match="NoSuchKey"):
        list(open_source(f"s3://{bucket}/lists/gone.csv", settings_).refs())


# ---------------------------------------------------------------------------------------------
# the command line: bad lines in the summary and the output; --strict stops before annotating


@pytest.mark.slow
def test_annotate_writes_one_record_per_line_and_strict_stops_at_the_first_bad_one(
    model_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "a.jpg").write_bytes(photo_jpeg(64, 48))
    manifest = tmp_path / "list.jsonl"
    manifest.write_bytes(b'{"uri": "a.jpg"}\n{"url": "b.jpg"}\n\xff\n{"uri": "missing.jpg"}\n')
    out = tmp_path / "out.jsonl"

    strict = run_cli("annotate", str(manifest), "--tasks", "moderation", "--out", str(out), "--strict", env=model_env)
    assert strict.returncode == 2 and not out.exists()
    first_bad = f"error: {manifest} line 2: no uri on this line; --strict stops at the first bad line"
    assert strict.stderr.strip().splitlines() == [first_bad]

    result = run_cli("annotate", str(manifest), "--tasks", "moderation", "--out", str(out), "-q", env=model_env)
    assert result.returncode == 0, result.stderr
    records = read_records(out)
    assert [(r.uri, r.error.kind if r.error else None) for r in records] == [
        (file_uri(tmp_path / "a.jpg"), None),
        (line_uri(manifest, 2), "bad_reference"),
        (line_uri(manifest, 3), "bad_reference"),
        (file_uri(tmp_path / "missing.jpg"), "not_found"),
    ]
    assert re.search(r"bad_reference\s+│?\s*2", result.stderr), result.stderr  # the summary counts them


# ---------------------------------------------------------------------------------------------
# properties (hypothesis): any input is references and bad lines, never a surprise


def check_listing(path: Path, got: list[tuple[int, ImageRef]]) -> None:
    """Line numbers rise; each reference is a readable uri or a bad line naming itself."""
    numbers = [line for line, _ in got]
    assert numbers == sorted(set(numbers))
    for line, ref in got:
        if ref.problem is None:
            assert ref.uri.startswith(("s3://", "file://")), ref
        else:
            assert ref.uri == line_uri(path, line)
            assert not re.search(r"[\x00\ud800-\udfff]", ref.problem)
            ref.model_dump_json()  # a record of it can be written


@PROPERTY
@given(data=st.binary(max_size=400), fmt=st.sampled_from([".txt", ".jsonl", ".csv"]))
def test_property_any_bytes_list_without_surprises(tmp_path: Path, data: bytes, fmt: str) -> None:
    path = tmp_path / f"any{fmt}"
    path.write_bytes(data)
    try:
        got = listed(path)
    except SourceError:  # a CSV whose first row names several columns but no uri: the whole file is unusable
        assert fmt == ".csv"
        return
    check_listing(path, got)
    assert len(got) <= data.count(b"\n") + data.count(b"\r") + 1  # a file may end its lines with CRs


@PROPERTY
@given(data=st.binary(max_size=400), compression=st.sampled_from([".gz", ".zst"]), cut=st.floats(0, 1))
def test_property_any_compressed_bytes_cut_anywhere_list_without_surprises(
    tmp_path: Path, data: bytes, compression: str, cut: float
) -> None:
    path = tmp_path / f"any.txt{compression}"
    whole = compress(data, compression)
    path.write_bytes(whole[: round(len(whole) * cut)])
    got, error = attempt(lambda: listed(path))
    if error is not None:  # cut inside the header: nothing of it can be read
        assert isinstance(error, SourceError) and "cannot read the manifest" in str(error)
        return
    assert got is not None
    check_listing(path, got)


LINE_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\n\r"), max_size=40)


@PROPERTY
@given(texts=st.lists(LINE_TEXT, max_size=20), ending=st.sampled_from(["\n", "\r\n", "\r"]))
def test_property_every_text_line_is_accounted_for(tmp_path: Path, texts: list[str], ending: str) -> None:
    assume(not texts or not texts[0].startswith("\ufeff"))  # first in the file, U+FEFF is the byte-order mark
    path = tmp_path / "lines.txt"
    path.write_text("".join(t + ending for t in texts), encoding="utf-8", newline="")
    got = listed(path)
    check_listing(path, got)
    # str.strip, like the reader: Unicode whitespace such as U+0085 and U+2028 is blank too
    entries = [i + 1 for i, t in enumerate(texts) if t.strip() and not t.strip().startswith("#")]
    assert [line for line, _ in got] == entries


GOOD = st.builds(lambda key: f"s3://bucket/{key}.jpg", st.text("abc xyz;,\"'é日", min_size=1, max_size=8))
BAD_URIS = st.sampled_from(["http://x/y.jpg", "s3://", "gs://b/k.jpg", "file://host/x.jpg", "s3://bucket/"])
SPEC = st.one_of(
    GOOD.map(lambda uri: ("good", uri)),
    BAD_URIS.map(lambda uri: ("bad_uri", uri)),
    st.just(("undecodable", "")),
    st.just(("no_uri", "")),
)


def encode_manifest(specs: list[tuple[str, str]], fmt: str, delimiter: str, encoding: str, ending: str) -> bytes:
    """A manifest of one line per spec (after a header, for CSV)."""
    mark = {"utf-8-sig": codecs.BOM_UTF8, "utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE}
    codec = "utf-8" if encoding == "utf-8-sig" else encoding
    out = mark.get(encoding, b"")
    if fmt == ".csv":
        out += f"id{delimiter}uri{ending}".encode(codec)
    for i, (kind, uri) in enumerate(specs):
        if kind == "undecodable":  # a lone surrogate's code unit, or a byte UTF-8 never uses
            out += ("\ud800".encode(codec, "surrogatepass") if codec != "utf-8" else b"\xff") + ending.encode(codec)
            continue
        if fmt == ".jsonl":
            text = json.dumps({"uri": uri} if kind != "no_uri" else {"id": i}, ensure_ascii=False)
        elif fmt == ".csv":
            text = f'{i}{delimiter}"{uri.replace(chr(34), chr(34) * 2)}"' if kind != "no_uri" else f"{i}{delimiter}"
            text = text.removesuffix('"') if kind == "stray" else text  # its quote left open
        else:
            text = uri if kind != "no_uri" else "ftp://no/uri.jpg"  # text lines always hold a uri
        out += (text + ending).encode(codec)
    return out


@PROPERTY
@given(
    specs=st.lists(SPEC, max_size=12),
    fmt=st.sampled_from([".txt", ".jsonl", ".csv"]),
    delimiter=st.sampled_from([",", ";"]),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16-le", "utf-16-be"]),
    ending=st.sampled_from(["\n", "\r\n", "\r"]),
    compression=st.sampled_from(["", ".gz", ".zst"]),
)
def test_property_mixed_manifests_give_one_reference_per_line_in_order(
    tmp_path: Path,
    specs: list[tuple[str, str]],
    fmt: str,
    delimiter: str,
    encoding: str,
    ending: str,
    compression: str,
) -> None:
    path = tmp_path / f"mixed{fmt}{compression}"
    path.write_bytes(compress(encode_manifest(specs, fmt, delimiter, encoding, ending), compression))
    got = listed(path)
    check_listing(path, got)
    first = 2 if fmt == ".csv" else 1
    assert [line for line, _ in got] == list(range(first, first + len(specs)))
    for (kind, uri), (_, ref) in zip(specs, got, strict=True):
        assert (ref.uri == uri) if kind == "good" else (ref.problem is not None), (kind, uri, ref)


@pytest.mark.slow  # 300 examples take over a second; the fast tier has the stray-quote cases above
@PROPERTY
@given(
    uris=st.lists(GOOD, min_size=1, max_size=12),
    stray=st.integers(0, 11),
    delimiter=st.sampled_from([",", ";"]),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16-le", "utf-16-be"]),
    ending=st.sampled_from(["\n", "\r\n", "\r"]),
    compression=st.sampled_from(["", ".gz", ".zst"]),
)
def test_property_a_stray_csv_quote_costs_its_own_row_only(
    tmp_path: Path, uris: list[str], stray: int, delimiter: str, encoding: str, ending: str, compression: str
) -> None:
    stray %= len(uris)
    specs = [("stray" if i == stray else "good", uri) for i, uri in enumerate(uris)]
    path = tmp_path / f"rows.csv{compression}"
    path.write_bytes(compress(encode_manifest(specs, ".csv", delimiter, encoding, ending), compression))
    got = listed(path)
    check_listing(path, got)
    assert [line for line, _ in got] == list(range(2, 2 + len(uris)))
    last = stray == len(uris) - 1  # a quote left open on the last line is read as the csv module reads it
    assert [ref.uri for _, ref in got if ref.problem is None] == [u for i, u in enumerate(uris) if i != stray or last]


T = TypeVar("T")


def attempt(action: Callable[[], T]) -> tuple[T | None, UserError | None]:
    """What `action` returns, or the UserError it raises (anything else fails the test)."""
    try:
        return action(), None
    except UserError as exc:
        return None, exc


SINK_SCHEMES = ["postgresql://", "postgres://", "s3://", "s3tags://", "file://", "gs://", "redis://"]


@PROPERTY
@given(scheme=st.sampled_from([*SINK_SCHEMES, ""]), rest=st.text(max_size=60))
def test_property_any_sink_url_is_a_sink_or_one_user_error(scheme: str, rest: str) -> None:
    # a bare *.jsonl or *.parquet path is an output file: made on disk, so not made from any string here
    assume(scheme or not rest.lower().endswith((".jsonl", ".parquet")))
    writer, error = attempt(lambda: open_sink(scheme + rest))
    if error is not None:
        assert str(error)
        return
    assert isinstance(writer, Sink)
    writer.close()  # nothing was opened: made lazily, closed without a word


QUERY_TEXT = st.text(max_size=30)


@PROPERTY
@given(base=st.text(max_size=30).map(lambda s: s.replace("?", "")), query=QUERY_TEXT, pass_unknown=st.booleans())
def test_property_split_options_splits_or_says_what_is_wrong(base: str, query: str, pass_unknown: bool) -> None:
    url = f"{base}?{query}"
    split, error = attempt(lambda: split_options(url, {"format", "table"}, pass_unknown=pass_unknown))
    if error is not None:
        assert "unknown option" in str(error) or "once" in str(error)
        return
    assert split is not None
    rest, options = split
    assert rest.startswith(base) and set(options) <= {"format", "table"}


@PROPERTY
@given(values=st.dictionaries(st.sampled_from(["format", "table", "prefix"]), st.text(max_size=20)))
def test_property_options_round_trip_percent_encoded(values: dict[str, str]) -> None:
    from urllib.parse import quote

    query = "&".join(f"{name}={quote(value, safe='')}" for name, value in values.items())
    base, options = split_options(f"s3://b/out/?{query}", values.keys() | {"format"})
    assert base == "s3://b/out/" and options == values


# ---------------------------------------------------------------------------------------------
# distributed: the producer lists bad lines into chunks; a real worker records and counts them


def test_a_distributed_job_counts_every_manifest_line_bad_ones_as_bad_reference(
    dist_env: dict[str, str], bucket: str, pg_url: str, workers: list, tmp_path: Path
) -> None:
    endpoint = dist_env["IMAGEMILL_S3_ENDPOINT_URL"]
    upload_photos(endpoint, bucket, "lists/p/", 3)
    lines = [
        b'{"uri": "p/p0000.jpg"}',  # relative: under the manifest's own prefix
        b'{"url": "p/p0001.jpg"}',  # no uri
        f'{{"uri": "s3://{bucket}/lists/p/p0001.jpg"}}'.encode(),
        b'{"uri": "https://example.com/x.jpg"}',  # a scheme not read
        b"\xff\xfe",  # not UTF-8
        b'{"uri": "p/p0002.jpg"}',
        b'{"uri": "p/gone.jpg"}',  # not found, as any missing object
    ]
    manifest = f"s3://{bucket}/lists/today.jsonl.zst"
    body = zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n")
    s3_client(endpoint).put_object(Bucket=bucket, Key="lists/today.jsonl.zst", Body=body)

    strict = run_cli("submit", manifest, "--tasks", "moderation", "--strict", env=dist_env)
    assert strict.returncode == 2
    assert strict.stderr.strip().splitlines() == [
        f"error: {manifest} line 2: no uri on this line; --strict stops at the first bad line"
    ]
    registry = JobRegistry(dist_env["IMAGEMILL_BROKER_URL"])
    assert registry.recent() == []  # stopped before a job existed

    workers.append(start_worker(dist_env, tmp_path / "worker.log").wait_ready())
    result = run_cli("submit", manifest, "--tasks", "moderation", "--chunk-size", "3", "--wait", env=dist_env)
    assert result.returncode == 0, result.stderr + workers[0].log[-3000:]
    job_id = job_id_of(result.stdout)
    found = {uri: kind for uri, kind, _, _ in rows(pg_url, job_id)}
    assert found == {
        f"s3://{bucket}/lists/p/p0000.jpg": None,
        line_uri(manifest, 2): "bad_reference",
        f"s3://{bucket}/lists/p/p0001.jpg": None,
        line_uri(manifest, 4): "bad_reference",
        line_uri(manifest, 5): "bad_reference",
        f"s3://{bucket}/lists/p/p0002.jpg": None,
        f"s3://{bucket}/lists/p/gone.jpg": "not_found",
    }
    job = registry.get(job_id)
    assert job is not None and job.state == JobState.DONE
    assert (job.listed, job.queued, job.annotated, job.failed) == (len(lines), len(lines), 3, 4)
    assert job.failed_by_kind == {"bad_reference": 3, "not_found": 1}
    status = run_cli("status", job_id, env=dist_env)
    assert re.search(r"bad_reference\s+│?\s*3", status.stdout), status.stdout
    # a retry fetches the missing image again, not the manifest's bad lines: those need the manifest fixed
    retry = run_cli("retry", job_id, env=dist_env)
    assert retry.returncode == 0 and "retrying 1 failed images" in retry.stderr, retry.stderr
