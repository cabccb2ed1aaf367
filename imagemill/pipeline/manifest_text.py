"""A manifest's bytes as numbered lines of text: decompressed (gzip, zstd), decoded by its byte-order mark.

A line that cannot be decoded, or is absurdly long, is still a line: it carries the reason instead of
text, so the formats above can make it one bad entry and go on. Read in blocks, never whole.
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
        # GzipFile reads concatenated members and raises EOFError on a cut-short file
        with gzip.GzipFile(fileobj=stream, mode="rb") as unzipped:
            yield from iter(partial(unzipped.read, READ_SIZE), b"")
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

    A fault reading the very first block is a SourceError (nothing of the manifest can be read); one
    later is a last line carrying the reason, after the lines that were read."""
    try:
        head = next(blocks, b"")
        while len(head) < 4 and (more := next(blocks, b"")):
            head += more
    except READ_ERRORS as exc:
        raise SourceError(f"cannot read the manifest: {_reason(exc)}") from None
    encoding, head = _encoding(head)
    newline = "\n".encode(encoding)
    number = 0
    try:
        for raw in _split(head, blocks, newline):
            number += 1
            yield _decode(number, raw, encoding)
    except READ_ERRORS as exc:
        yield Line(number + 1, None, f"the manifest cannot be read past line {number}: {_reason(exc)}")


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


def _split(head: bytes, blocks: Iterator[bytes], newline: bytes) -> Iterator[bytes | None]:
    """Raw lines without their line feed; None for a line over MAX_LINE_BYTES (its bytes are dropped
    as they come, so a file with no line breaks cannot fill memory)."""
    unit = len(newline)  # 2 in UTF-16: a line feed counts only on a code unit boundary
    rest, overlong = head, False
    while True:
        start = 0
        while (end := _find(rest, newline, start, unit)) != -1:
            yield None if overlong else rest[start:end]
            start, overlong = end + unit, False
        rest = rest[start:]
        if len(rest) > MAX_LINE_BYTES:
            keep = len(rest) % unit  # stay on a code unit boundary
            rest, overlong = rest[len(rest) - keep :], True
        block = next(blocks, b"")
        if not block:
            break
        rest += block
    if rest or overlong:
        yield None if overlong else rest


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
