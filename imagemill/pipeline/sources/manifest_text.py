"""A manifest's bytes as numbered lines of text: decompressed (gzip, zstd), decoded by its byte-order mark.

A line that cannot be decoded, or is absurdly long, is still a line: it carries the reason instead of
text, so the formats above can make it one bad entry and go on. Read in blocks, never whole. Lines end
at LF or CR LF, or also at a lone CR in a file whose first line break is one (classic Mac OS, Excel).
"""

import codecs
import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import IO

import zstandard
from botocore.exceptions import BotoCoreError

from imagemill.core.errors import SourceError

READ_SIZE = 1 << 16
MAX_LINE_BYTES = 1 << 20  # a manifest line names one image: a megabyte is a damaged file, not a uri
# faults of a stream that was readable at first: the lines before them stand
READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, BotoCoreError)
COMPRESSIONS = (".gz", ".zst")


@dataclass(frozen=True)
class Line:
    """Line `number` (from 1) of a manifest: its `text` without the line break, or None and `error`."""

    number: int
    text: str | None
    error: str = ""


def decompressed(stream: IO[bytes], compression: str | None) -> Iterator[bytes]:
    """The stream's content in blocks: as stored, or through gzip (`.gz`) or zstd (`.zst`)."""
    if compression == ".gz":
        # GzipFile reads concatenated members and raises EOFError on a cut-short file. read1, not read:
        # read gathers a whole block first, so a cut would take the lines decompressed before it along
        with gzip.GzipFile(fileobj=stream, mode="rb") as unzipped:
            yield from iter(partial(unzipped.read1, READ_SIZE), b"")
    elif compression == ".zst":
        yield from _unzstd(stream)
    else:
        yield from iter(partial(stream.read, READ_SIZE), b"")


def _unzstd(stream: IO[bytes]) -> Iterator[bytes]:
    """zstd frames one after another (as `zstd` and `pzstd` write them); a cut-short last frame is an error
    (the library's stream reader would end quietly, losing the lines in it without a word)."""
    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    started = False
    for block in iter(partial(stream.read, READ_SIZE), b""):
        while block:
            started = True
            if data := frame.decompress(block):
                yield data
            if not frame.eof:
                break
            block, frame = frame.unused_data, decompressor.decompressobj()
            started = False
    if started:
        raise EOFError("the zstd stream ends inside a frame (the file is cut short)")


def lines(blocks: Iterator[bytes]) -> Iterator[Line]:
    """Numbered lines of the content: UTF-8 (a byte-order mark is dropped), or UTF-16 with its mark.

    A fault before any content could be read is a SourceError (nothing of the manifest can be read);
    one later, wherever it falls, is a last line carrying the reason, after every whole line read."""
    head = b""
    try:
        while len(head) < 4 and (more := next(blocks, b"")):
            head += more
    except READ_ERRORS as exc:
        if not head:
            raise SourceError(f"cannot read the manifest: {_reason(exc)}") from None
        blocks = _raising(exc)  # a few bytes came before the fault: their lines stand
    encoding, head = _encoding(head)
    number = 0
    try:
        for raw in _split(head, blocks, encoding):
            number += 1
            yield _decode(number, raw, encoding)
    except READ_ERRORS as exc:
        yield Line(number + 1, None, f"the manifest cannot be read past line {number}: {_reason(exc)}")


def _raising(exc: BaseException) -> Iterator[bytes]:
    """Blocks that end in `exc`: the fault met while the head was read, raised where the next block is."""
    yield from ()
    raise exc


def _encoding(head: bytes) -> tuple[str, bytes]:
    """The encoding the byte-order mark names (UTF-8 without one), and the content after the mark."""
    for mark, encoding in (
        (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"),
    ):
        if head.startswith(mark):
            return encoding, head[len(mark) :]
    return "utf-8", head


def _split(head: bytes, blocks: Iterator[bytes], encoding: str) -> Iterator[bytes | None]:
    """Raw lines without their line break; None for a line over MAX_LINE_BYTES (its bytes are dropped
    as they come, so a file with no line breaks cannot fill memory).

    A line ends at an LF (the CR of a CR LF is dropped when it is decoded). A file whose first line
    break is a lone CR (Excel's "CSV (Macintosh)", classic Mac OS) ends its lines at a CR, an LF or a
    CR LF alike; deciding by the first break keeps a stray CR inside a line of an LF file in its line."""
    lf, cr = "\n".encode(encoding), "\r".encode(encoding)
    unit = len(lf)  # 2 in UTF-16: a line break counts only on a code unit boundary
    rest, overlong, done = head, False, False
    cr_lines: bool | None = None  # undecided until the first line break is seen whole
    while True:
        if cr_lines is None:
            cr_lines = _lone_cr_first(rest, lf, cr, unit, done)
        start = 0
        if cr_lines is not None:
            for end, after in _any_breaks(rest, lf, cr, unit, done) if cr_lines else _breaks(rest, lf, unit):
                yield None if overlong else rest[start:end]
                start, overlong = after, False
        rest = rest[start:]
        if len(rest) > MAX_LINE_BYTES:
            # drop the line's bytes but its last code unit (a CR there may be half of a CR LF), on a boundary
            keep = unit + len(rest) % unit
            rest, overlong = rest[len(rest) - keep :], True
        if done:
            break
        block = next(blocks, b"")
        done = not block
        rest += block
    if rest or overlong:
        yield None if overlong else rest


def _lone_cr_first(rest: bytes, lf: bytes, cr: bytes, unit: int, done: bool) -> bool | None:
    """Whether the first line break in `rest` is a lone CR; None while that cannot be known yet (no
    break so far, or a CR last that the next block may follow with an LF)."""
    first_lf, first_cr = _find(rest, lf, 0, unit), _find(rest, cr, 0, unit)
    if first_cr == -1 or (first_lf != -1 and first_lf < first_cr):
        return False if first_lf != -1 or done else None
    if first_cr + unit == len(rest) and not done:
        return None
    return rest[first_cr + unit : first_cr + 2 * unit] != lf


def _breaks(data: bytes, lf: bytes, unit: int) -> Iterator[tuple[int, int]]:
    """Where each line of `data` ends at an LF, and where the next begins."""
    start = 0
    while (end := _find(data, lf, start, unit)) != -1:
        start = end + unit
        yield end, start


def _any_breaks(data: bytes, lf: bytes, cr: bytes, unit: int, done: bool) -> Iterator[tuple[int, int]]:
    """Where each line of `data` ends at a CR, an LF or a CR LF, and where the next begins; a CR last
    is left for the next block (it may be the first half of a CR LF) unless the content is `done`."""
    start = 0
    next_lf, next_cr = _find(data, lf, 0, unit), _find(data, cr, 0, unit)
    while next_lf != -1 or next_cr != -1:
        if next_cr == -1 or (next_lf != -1 and next_lf < next_cr):
            end, start = next_lf, next_lf + unit
        elif next_cr + unit == len(data) and not done:
            return
        else:
            end = next_cr
            start = end + (2 * unit if data[end + unit : end + 2 * unit] == lf else unit)
        yield end, start
        # each search starts where the last one left off: the content is scanned once, not once a line
        if next_lf != -1 and next_lf < start:
            next_lf = _find(data, lf, start, unit)
        if next_cr != -1 and next_cr < start:
            next_cr = _find(data, cr, start, unit)


def _find(data: bytes, newline: bytes, start: int, unit: int) -> int:
    end = data.find(newline, start)
    while end != -1 and (end - start) % unit:
        end = data.find(newline, end + 1)
    return end


def _decode(number: int, raw: bytes | None, encoding: str) -> Line:
    if raw is None:
        return Line(number, None, f"the line is longer than {MAX_LINE_BYTES:,} bytes")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        name = "UTF-8" if encoding == "utf-8" else "UTF-16"
        return Line(number, None, f"not {name} text ({exc.reason} at byte {exc.start} of the line)")
    return Line(number, text.removesuffix("\r"))


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
