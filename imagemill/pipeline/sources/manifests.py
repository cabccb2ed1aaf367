"""Manifests: files naming images, as other tools write them. JSONL, CSV and text (plain, `.gz` or `.zst`)
and Parquet, on disk or on S3; each line becomes one reference, a bad line a reference that says why.

A bad line never stops a listing: it is listed as `manifest:<uri>#L<n>` (the manifest named whole) with its
reason, and the engine makes it a `bad_reference` record like any other failed image. `check` is `--strict`'s
validation pass.
"""

import csv
import json
import os
import re
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError
from botocore.handlers import VALID_BUCKET, VALID_S3_ARN
from pydantic import ValidationError

from imagemill.core.errors import SourceError
from imagemill.core.images import LazyS3Client, file_uri, is_s3, local_path, local_ref, parse_s3, s3_uri
from imagemill.core.schemas import ImageRef
from imagemill.pipeline.sources.manifest_text import COMPRESSIONS, Line, decompressed, lines

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

TEXT_FORMATS = (".jsonl", ".ndjson", ".csv", ".txt")
MANIFEST_FORMATS = (*TEXT_FORMATS, ".parquet")
MAX_URI_LENGTH = 4096  # ImageRef's bound
LONGEST_LINE_NUMBER = 10**15  # more lines than any manifest: the widest `#L<n>` a bad line's uri gets
PARQUET_BATCH_ROWS = 8192
# a scheme of two letters or more: `C:\x.jpg` stays a path, `https:` and `gs:` are URIs we do not read
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SURROGATE = re.compile(r"[\ud800-\udfff]")  # from a JSON `\ud800` escape: not text any sink can hold
CSV_DELIMITERS = (",", ";", "\t")
# a CSV row (a quoted field holding line breaks) spans at most this many lines: past it, the quote that
# opened it was a stray one. Room for any spreadsheet cell (Excel's hold at most 253 line breaks); the
# csv module's own field limit (131,072 characters) bounds the memory a row takes
MAX_RECORD_LINES = 1000
# a header-less CSV: its first row has a cell like a path or file name (`/`, or a short extension)
REFERENCE_LIKE = re.compile(r"[/\\]|\.[A-Za-z][A-Za-z0-9]{1,4}$")


def manifest_kind(name: str) -> tuple[str, str | None] | None:
    """(format, compression) of a manifest's file or key name, e.g. (".csv", ".gz"); None if not one."""
    lower = name.lower()
    compression = next((c for c in COMPRESSIONS if lower.endswith(c)), None)
    stem = lower.removesuffix(compression) if compression else lower
    fmt = os.path.splitext(stem)[1]
    if fmt in TEXT_FORMATS or (fmt == ".parquet" and compression is None):
        return fmt, compression
    return None


@dataclass(frozen=True)
class Entry:
    """One line (or Parquet row) of a manifest: its fields, or the reason it names no image."""

    line: int
    fields: Mapping[str, object] | None
    problem: str | None = None


@dataclass(frozen=True)
class ManifestSource:
    """A manifest at a local path or `s3://bucket/key`, listed line by line in file order.

    Entries may be s3:// URIs, file:// URIs or paths; a relative path is relative to the manifest
    (beside a local file; under the same key prefix for a manifest on S3). `client` reads S3."""

    location: Path | str
    client: "S3Client | LazyS3Client | None" = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if manifest_kind(self.name) is None:
            raise SourceError(f"{self.location} is not a manifest (expected {describe_formats()})")
        if len(self.line_uri(LONGEST_LINE_NUMBER)) > MAX_URI_LENGTH:  # else only its first bad line would say
            raise SourceError(
                f"the manifest's name is too long to name its lines' records by ({len(self.uri):,} characters"
                f" as a URI): {_show(str(self.location))}"
            )

    def __str__(self) -> str:
        return str(self.location)

    @property
    def name(self) -> str:
        """The file or key name, without its folder or prefix."""
        return str(self.location).rpartition("/")[2]

    @cached_property
    def uri(self) -> str:
        """The manifest, whole, as bad lines are named `manifest:<uri>#L<n>`: `s3://bucket/key` as given,
        or a local file's `file://` URI (of its absolute path, as its images are named), the same from
        any working directory. Two manifests never share one, and a run again names a line the same."""
        if isinstance(self.location, str) and is_s3(self.location):
            return self.location
        return file_uri(Path(self.location))

    def refs(self) -> Iterator[ImageRef]:
        return (ref for _, ref in self.numbered())

    def check(self) -> int:
        """`--strict`: read the whole manifest; SourceError naming the first bad line, else the count."""
        count = 0
        for line, ref in self.numbered():
            if ref.problem is not None:
                raise SourceError(f"{self} line {line}: {ref.problem}; --strict stops at the first bad line")
            count += 1
        return count

    def numbered(self) -> Iterator[tuple[int, ImageRef]]:
        """Every entry's line number (row number for Parquet) and reference, in file order."""
        fmt, compression = manifest_kind(self.name) or (".txt", None)
        with ExitStack() as stack:
            stream = self._open(stack)
            if fmt == ".parquet":
                entries = parquet_entries(stream, str(self))
            else:
                read = lines(decompressed(stream, compression))
                entries = csv_entries(read, str(self)) if fmt == ".csv" else TEXT_PARSERS[fmt](read)
            for entry in entries:
                yield entry.line, self._ref(entry)

    def _open(self, stack: ExitStack) -> IO[bytes]:
        if not isinstance(self.location, str) or not is_s3(self.location):
            try:
                return stack.enter_context(Path(self.location).open("rb"))
            except OSError as exc:
                raise SourceError(f"cannot read the manifest {self}: {exc.strerror or exc}") from None
        client = self.client.get() if isinstance(self.client, LazyS3Client) else self.client
        if client is None:
            raise SourceError(f"no S3 client to read the manifest {self}")
        loc = parse_s3(self.location)
        try:
            if self.name.lower().endswith(".parquet"):
                # Parquet's index is at the end of the file: it needs a seekable copy, on disk past 64 MiB
                spool = stack.enter_context(tempfile.SpooledTemporaryFile(max_size=64 << 20))  # noqa: SIM115 - closed by the stack
                client.download_fileobj(loc.bucket, loc.key, spool)
                spool.seek(0)
                return spool
            body = client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
        except ClientError as exc:
            error = exc.response.get("Error", {})
            reason = f"{error.get('Code', '')} {error.get('Message', '')}".strip()
            raise SourceError(f"cannot read the manifest {self}: {reason}") from None
        except BotoCoreError as exc:
            raise SourceError(f"cannot read the manifest {self}: {exc}") from None
        stack.callback(body.close)
        return body  # type: ignore[return-value]  # botocore's StreamingBody reads like a binary file

    def _ref(self, entry: Entry) -> ImageRef:
        if entry.problem is not None:
            return self.bad(entry.line, entry.problem)
        fields = entry.fields or {}
        uri = fields.get("uri")
        if uri is None:
            return self.bad(entry.line, "no uri on this line")
        if not isinstance(uri, str):
            return self.bad(entry.line, f"the uri is not text but {type(uri).__name__}")
        uri = uri.strip()
        if problem := uri_problem(uri):
            return self.bad(entry.line, problem)
        try:
            if uri.startswith("file://") and fields.get("etag") is None:
                return local_ref(local_path(uri))  # as a path entry is: etag from mtime and size, incremental
            if SCHEME.match(uri):  # s3:// or file://, checked above
                return ImageRef.model_validate({"uri": uri, "etag": fields.get("etag"), "size": fields.get("size")})
            return self._path(uri)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            return self.bad(entry.line, f"bad {where}: {error['msg']}")

    def _path(self, path: str) -> ImageRef:
        """A path entry: an absolute one as it is; a relative one beside a local manifest, or under
        the key prefix of a manifest on S3."""
        if os.path.isabs(path):
            return local_ref(Path(path))
        if isinstance(self.location, str) and is_s3(self.location):
            loc = parse_s3(self.location)
            folder = loc.key.rpartition("/")[0]
            return ImageRef(uri=s3_uri(loc.bucket, f"{folder}/{path}" if folder else path))
        return local_ref(Path(self.location).parent / path)

    def bad(self, line: int, problem: str) -> ImageRef:
        """The reference a bad line is listed as: it names the manifest and line, and says why."""
        return ImageRef(uri=self.line_uri(line), problem=problem[:1000])

    def line_uri(self, line: int) -> str:
        """`manifest:<uri>#L<n>`: what a bad line is named by (its record's key)."""
        return f"manifest:{self.uri}#L{line}"


def uri_problem(uri: str) -> str | None:
    """Why an entry's uri names nothing imagemill can read, or None: s3://, file:// and paths are read."""
    if not uri:
        return "empty uri"
    if len(uri) > MAX_URI_LENGTH:
        return f"the uri is {len(uri):,} characters long (at most {MAX_URI_LENGTH:,})"
    if SURROGATE.search(uri):
        return f"the uri is not valid Unicode: {_show(uri)}"
    if CONTROL.search(uri):
        return f"the uri holds a control character: {_show(uri)}"
    scheme = SCHEME.match(uri)
    if scheme is None:
        return f"not a URI (no scheme before ://): {_show(uri)}" if "://" in uri else None
    name = scheme.group(1).lower()
    if name == "s3":
        if not uri.startswith("s3://"):
            return f"not an s3:// URI (s3://bucket/key): {_show(uri)}"
        loc = parse_s3(uri) if uri[5:6] not in ("", "/") else None
        if loc is None:
            return f"no bucket in {_show(uri)}"
        if not (VALID_BUCKET.match(loc.bucket) or VALID_S3_ARN.match(loc.bucket)):  # botocore's own rule
            return f"not an S3 bucket name: {_show(loc.bucket)}"
        if not loc.key or loc.key.endswith("/"):
            return f"names a bucket or folder, not an object: {_show(uri)}"
        return None
    if name == "file":
        if not uri.startswith("file://"):
            return f"not a file:// URI (file:///absolute/path): {_show(uri)}"
        host, _, path = uri[len("file://") :].partition("/")
        if host not in ("", "localhost"):
            return f"a file:// URI names this machine's files, not host {host!r}: {_show(uri)}"
        if not path:
            return f"no path in {_show(uri)}"
        return None
    return f"the {name}: scheme is not one imagemill reads (s3://, file:// or a path): {_show(uri)}"


def _show(text: str, limit: int = 200) -> str:
    """A value quoted for a message: escaped (no control characters or surrogates reach a record), cut short."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def jsonl_entries(read: Iterable[Line]) -> Iterator[Entry]:
    """One JSON object with a `uri` (any case) per line; blank lines are skipped."""
    for line in read:
        if line.text is None:
            yield Entry(line.number, None, line.error)
            continue
        text = line.text.strip()
        if not text:
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            yield Entry(line.number, None, f"not JSON: {exc.msg} at column {exc.colno}")
            continue
        except (ValueError, RecursionError) as exc:  # digits past Python's limit, nesting past the stack
            yield Entry(line.number, None, f"not JSON this reader takes: {type(exc).__name__}")
            continue
        if not isinstance(value, dict):
            yield Entry(line.number, None, f"expected a JSON object with a uri, not {type(value).__name__}")
            continue
        yield Entry(line.number, _known_fields(value))


def txt_entries(read: Iterable[Line]) -> Iterator[Entry]:
    """One uri or path per line; blank lines and lines starting with `#` are skipped."""
    for line in read:
        if line.text is None:
            yield Entry(line.number, None, line.error)
            continue
        text = line.text.strip()
        if text and not text.startswith("#"):
            yield Entry(line.number, {"uri": text})


TEXT_PARSERS = {".jsonl": jsonl_entries, ".ndjson": jsonl_entries, ".txt": txt_entries}


def _known_fields(values: Mapping[str, object]) -> dict[str, object]:
    """`uri`, `etag` and `size`, their names in any case (an exact `uri` wins over `URI`)."""
    found: dict[str, object] = {}
    for key, value in values.items():
        name = str(key).strip().lower()
        if name in ("uri", "etag", "size") and (name not in found or key == name):
            found[name] = value
    return found


def csv_entries(read: Iterable[Line], where: str) -> Iterator[Entry]:
    """CSV as spreadsheets save it: comma, semicolon or tab (whichever the first line has most of,
    outside quotes), quoted fields, CRLF. The `uri` column is found in any case, or is the only column;
    a first row that already looks like a reference (a cell with `/` or a file extension) means no header.

    A row the reader refuses (a stray quote left open past the bound, a closing quote that does not end
    its field, a field over the csv module's size limit) is one bad entry at the row's first line, and
    reading resumes at the line after it: the lines a stray quote swallowed are read again as rows."""
    read = iter(read)
    first: Line | None = None
    for line in read:  # before the first row: a line that cannot be decoded is a bad line of its own
        if line.text is None:
            yield Entry(line.number, None, line.error)
        elif line.text.strip():
            first = line
            break
    if first is None or first.text is None:
        return
    records = CsvRecords(read, _delimiter(first.text), deque([first]))
    columns: dict[str, int] | None = None
    for record in records:
        number, problem = record.lines[0].number, record.problem
        for line in record.lines:  # a line that cannot be decoded makes its row bad
            if problem is None and line.text is None:
                problem = line.error
        if problem is not None:
            yield Entry(number, None, problem)
            continue
        if columns is None:  # the first row: a header, or the first entry of a CSV without one
            columns = _columns(record.cells, where)
            if columns is not None:
                continue
            columns = {"uri": _uri_column(record.cells)}
        fields = {name: record.cells[i] for name, i in columns.items() if i < len(record.cells)}
        if len(record.lines) > 1 and "\n" in fields.get("uri", ""):
            # no uri holds a line break: a quote opened the field by mistake and took the next lines along
            records.reread(record.lines[1:])
            last = record.lines[-1].number
            yield Entry(number, None, f"a quoted field runs on to line {last}, putting a line break in the uri")
        elif any(cell.strip() for cell in record.cells):
            yield Entry(number, {name: value for name, value in fields.items() if value.strip()})


class OpenQuote(Exception):
    """A CSV row still open (in a quoted field) after MAX_RECORD_LINES lines."""


@dataclass(slots=True)  # one per row: made as cheaply as a dataclass can be
class CsvRecord:
    """One CSV row and the lines it spans, or its first line and why the reader refused it."""

    lines: list[Line]
    cells: list[str]
    problem: str | None = None


@dataclass
class CsvRecords:
    """The rows of numbered lines, read by the csv module with a way back: the lines of a row after its
    first can be handed back to be read again (a stray quote's row is one bad line, not all it took)."""

    lines: Iterator[Line]
    delimiter: str
    pending: deque[Line] = field(default_factory=deque)  # read before `lines`: handed back, or the first
    current: list[Line] = field(default_factory=list)  # the lines of the row being read

    def __iter__(self) -> Iterator[CsvRecord]:
        while True:
            # strict: a closing quote must end its field, so a stray opening one cannot end at the next
            # quote it meets (`"a` then `1,"b"`) and quietly make one row of the lines between
            reader = csv.reader(self._feed(), delimiter=self.delimiter, strict=True)
            try:
                for cells in reader:
                    yield CsvRecord(self._take(), cells)
                return
            except OpenQuote as exc:
                problem = str(exc)
            except csv.Error as exc:
                problem = f"not CSV: {exc}"
            lines = self._take()
            if not lines:  # refused before a line was read: nothing to go on from (not seen, but it must end)
                return
            if len(lines) == 1 and (lenient := self._lenient(lines[0])) is not None:
                # a row on one line is read as the csv module reads by default (`"a" ,b`, a quote left
                # open on the last line): only rows over several lines must be well formed
                yield CsvRecord(lines, lenient)
                continue
            self.reread(lines[1:])  # a new reader from the row's second line: the old one is left mid-row
            yield CsvRecord(lines[:1], [], problem)

    def reread(self, lines: list[Line]) -> None:
        """Read these lines again, before any other."""
        self.pending.extendleft(reversed(lines))

    def _lenient(self, line: Line) -> list[str] | None:
        try:
            return next(csv.reader([(line.text or "") + "\n"], delimiter=self.delimiter), [])
        except csv.Error:  # a field over the size limit
            return None

    def _take(self) -> list[Line]:
        lines, self.current = self.current, []
        return lines

    def _feed(self) -> Iterator[str]:
        """The lines, one string each, to the csv reader; OpenQuote once a row would pass the bound."""
        while True:
            line = self.pending.popleft() if self.pending else next(self.lines, None)
            if line is None:
                return
            if len(self.current) == MAX_RECORD_LINES:
                self.pending.appendleft(line)
                raise OpenQuote(
                    f"a quoted field opened on this line is still open {MAX_RECORD_LINES:,} lines on: a stray quote?"
                )
            self.current.append(line)
            text = line.text or ""  # an undecodable line: blank to the reader, its error kept on the Line
            yield text + "\n"


def _delimiter(line: str) -> str:
    """The delimiter the header (or first row) uses most, outside quoted fields; a comma if none."""
    outside = "".join(part for i, part in enumerate(line.split('"')) if i % 2 == 0)
    counts = {d: outside.count(d) for d in CSV_DELIMITERS}
    best = max(CSV_DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def _columns(header: list[str], where: str) -> dict[str, int] | None:
    """Where `uri`, `etag` and `size` are in a header row; None when the row is data, not a header."""
    names = [cell.strip().lstrip("\ufeff").strip().lower() for cell in header]
    if "uri" in names:
        return {name: names.index(name) for name in ("uri", "etag", "size") if name in names}
    if any(REFERENCE_LIKE.search(cell.strip()) for cell in header):
        return None
    if len(header) == 1:
        return {"uri": 0}  # the only column, whatever its name
    raise SourceError(f"{where}: no 'uri' column (columns: {[cell.strip() for cell in header]})")


def _uri_column(row: list[str]) -> int:
    return next(i for i, cell in enumerate(row) if REFERENCE_LIKE.search(cell.strip()))


def parquet_entries(stream: IO[bytes], where: str) -> Iterator[Entry]:
    """Rows of a Parquet file with a `uri` column (any case, or the only column), read a batch at a time."""
    import pyarrow as pa  # the reader is loaded only for a Parquet manifest
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(stream)
    except (pa.ArrowException, OSError) as exc:
        raise SourceError(f"{where} is not a readable Parquet file: {exc}") from None
    names: list[str] = list(table.schema_arrow.names)
    lower = [name.lower() for name in names]
    if "uri" in lower:
        wanted = [names[lower.index(name)] for name in ("uri", "etag", "size") if name in lower]
    elif len(names) == 1:
        wanted = names
    else:
        raise SourceError(f"{where}: no 'uri' column (columns: {names})")
    keys = ["uri", *(name.lower() for name in wanted[1:])]
    row = 0
    try:
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
            columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
            for values in zip(*columns, strict=True):
                row += 1
                yield _parquet_entry(row, dict(zip(keys, values, strict=True)))
    except (pa.ArrowException, OSError) as exc:
        yield Entry(row + 1, None, f"the manifest cannot be read past row {row}: {exc}")


def _parquet_entry(row: int, values: dict[str, object]) -> Entry:
    uri = values.get("uri")
    if isinstance(uri, bytes):  # a binary column: text only if it decodes
        try:
            values["uri"] = uri.decode()
        except UnicodeDecodeError:
            return Entry(row, None, "the uri is not UTF-8 text")
    return Entry(row, {k: v for k, v in values.items() if v is not None})


def describe_formats() -> str:
    return ".jsonl, .csv, .txt (each also .gz or .zst) or .parquet"


def check(source: object) -> None:
    """`--strict`'s validation pass, before any annotation: a manifest is read through, and its first
    bad line is a SourceError. Other sources have no lines to be bad."""
    if isinstance(source, ManifestSource):
        source.check()
