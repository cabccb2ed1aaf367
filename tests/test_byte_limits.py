"""IMAGEMILL_MAX_IMAGE_BYTES: an object over the limit is refused from its listed size before any
download, else from its file size or Content-Length, and never read past the limit.

S3 requests are counted by the fault-injecting proxy in front of the moto server (the server's
own view of what was asked), not by the client.
"""

import dataclasses
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.response import StreamingBody

from imagemill.core.errors import ErrorKind, ImageError
from imagemill.core.images import ObjectReader, file_uri, parse_s3, read_at_most
from imagemill.core.schemas import ImageRef
from imagemill.core.settings import Settings
from imagemill.core.sinks.files import read_records
from tests.fixtures.cli import run_cli
from tests.fixtures.faulty_s3 import FaultyProxy, faulty_proxy
from tests.fixtures.images import photo_jpeg
from tests.fixtures.s3 import s3_client

LIMIT = 1001  # odd: `LIMIT + 1` and `LIMIT | 1` differ


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultyProxy]:
    with faulty_proxy(s3_endpoint) as running:
        yield running


def reader(endpoint: str, limit: int = LIMIT) -> ObjectReader:
    return ObjectReader(Settings(s3_endpoint_url=endpoint, max_image_bytes=limit, s3_max_attempts=1))


def refused(read: ObjectReader, ref: ImageRef) -> str:
    with pytest.raises(ImageError) as raised:
        read.read(ref)
    assert raised.value.kind == ErrorKind.TOO_LARGE, raised.value.message
    assert "IMAGEMILL_MAX_IMAGE_BYTES" in raised.value.message
    return raised.value.message


def test_a_listed_size_over_the_limit_is_refused_without_a_request(
    proxy: FaultyProxy, bucket: str, tmp_path: Path
) -> None:
    s3_client(proxy.url).put_object(Bucket=bucket, Key="big.jpg", Body=b"x" * (LIMIT + 1))
    message = refused(reader(proxy.url), ImageRef(uri=f"s3://{bucket}/big.jpg", size=LIMIT + 1))
    assert "1,002 bytes" in message
    assert proxy.count("GET", "big.jpg") == 0 and proxy.count("HEAD", "big.jpg") == 0
    # a local file is not even opened: this one does not exist, and the answer is still too_large
    refused(reader(proxy.url), ImageRef(uri=file_uri(tmp_path / "gone.jpg"), size=LIMIT + 1))


def test_an_s3_object_over_the_limit_is_refused_from_its_content_length(
    proxy: FaultyProxy, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = s3_client(proxy.url)
    client.put_object(Bucket=bucket, Key="over.jpg", Body=b"x" * (LIMIT + 1))
    client.put_object(Bucket=bucket, Key="at.jpg", Body=b"y" * LIMIT)
    read = reader(proxy.url)
    bodies_read: list[int | None] = []
    real_read = StreamingBody.read
    monkeypatch.setattr(StreamingBody, "read", lambda body, amt=None: bodies_read.append(amt) or real_read(body, amt))
    refused(read, ImageRef(uri=f"s3://{bucket}/over.jpg"))  # no size listed: the answer's length decides
    assert proxy.count("GET", "over.jpg") == 1  # one request, not retried
    assert bodies_read == []  # refused from the headers: the body is closed unread
    # the limit itself is allowed, whether listed or not
    at = read.read(ImageRef(uri=f"s3://{bucket}/at.jpg", etag="listed"))
    assert at.data == b"y" * LIMIT
    assert at.etag == client.head_object(Bucket=bucket, Key="at.jpg")["ETag"].strip('"')  # the bytes' own version
    assert read.read(ImageRef(uri=f"s3://{bucket}/at.jpg", size=LIMIT)).data == b"y" * LIMIT
    client.put_object(Bucket=bucket, Key="small.jpg", Body=b"s" * 10)
    assert read.read(ImageRef(uri=f"s3://{bucket}/small.jpg", size=10)).data == b"s" * 10  # under it, of course


def test_an_s3_answer_without_a_length_is_read_no_further_than_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A streamed answer (no Content-Length) cannot be refused up front; reading stops one byte past the limit."""
    asked: list[int] = []

    class Body(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            asked.append(-1 if size is None else size)
            return super().read(size)

    class Client:
        def get_object(self, Bucket: str, Key: str) -> dict[str, object]:
            return {"Body": Body(b"z" * (LIMIT * 10)), "ETag": '"e"'}

    read = reader("http://127.0.0.1:1")
    monkeypatch.setattr(ObjectReader, "s3", property(lambda _: Client()))
    refused(read, ImageRef(uri="s3://b/streamed.jpg"))
    assert asked == [LIMIT + 1]
    monkeypatch.setattr(Client, "get_object", lambda *_, **__: {"Body": Body(b"z" * LIMIT)})
    assert read.read(ImageRef(uri="s3://b/streamed.jpg")).data == b"z" * LIMIT


def test_a_local_file_over_the_limit_is_refused_from_its_size(tmp_path: Path) -> None:
    over, at = tmp_path / "over.jpg", tmp_path / "at.jpg"
    over.write_bytes(b"x" * (LIMIT + 1))
    at.write_bytes(b"y" * LIMIT)
    read = reader("http://127.0.0.1:1")
    refused(read, ImageRef(uri=file_uri(over)))  # listed without a size (a manifest's bare path)
    # far over: refused from its size before any read, so the answer names the whole size
    far = tmp_path / "far.jpg"
    far.write_bytes(b"f" * (3 * LIMIT))
    assert "3,003 bytes" in refused(read, ImageRef(uri=file_uri(far)))
    assert read.read(ImageRef(uri=file_uri(at))).data == b"y" * LIMIT
    small = tmp_path / "small.jpg"
    small.write_bytes(b"s" * 10)
    assert read.read(ImageRef(uri=file_uri(small))).data == b"s" * 10


def test_a_file_whose_size_says_nothing_is_read_no_further_than_the_limit(tmp_path: Path) -> None:
    # a named pipe (or a file still growing) reports a size of 0 or less than it yields: the bytes
    # read decide, as for an S3 answer without a length
    pipe = tmp_path / "stream.jpg"
    os.mkfifo(pipe)

    def feed(data: bytes) -> threading.Thread:
        def write() -> None:
            with pipe.open("wb") as handle:
                handle.write(data)

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        return thread

    read = reader("http://127.0.0.1:1")
    writer = feed(b"p" * (LIMIT + 2))
    assert "1,002 bytes" in refused(read, ImageRef(uri=file_uri(pipe)))
    writer.join(timeout=10)
    writer = feed(b"q" * LIMIT)
    assert read.read(ImageRef(uri=file_uri(pipe))).data == b"q" * LIMIT
    writer.join(timeout=10)


class RecordedReads(io.BytesIO):
    """A stream that keeps the size of every read asked of it."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int | None] = []

    def read(self, size: int | None = -1, /) -> bytes:
        self.asked.append(size)
        return super().read(size)


CAP = LIMIT + 1  # what a file read asks at most: one byte over the limit tells it is over


@pytest.mark.parametrize(
    ("length", "size_hint", "asked"),
    [
        pytest.param(10, 10, [11], id="the size is right: one read of the size and one byte more"),
        pytest.param(700, 300, [301, CAP - 301], id="a growing file: the byte more came, the rest follows"),
        pytest.param(1, 1, [2], id="a one-byte file is a size like any other"),
        pytest.param(500, 0, [CAP], id="a pipe says 0: one read up to the cap"),
        pytest.param(LIMIT, LIMIT, [CAP], id="at the limit: the byte more is the cap, no second read"),
        pytest.param(LIMIT + 5, LIMIT, [CAP], id="grown over the limit: the cap, no second read"),
        pytest.param(3 * LIMIT, 3 * LIMIT, [CAP], id="over the limit: never more than the cap"),
        pytest.param(3 * LIMIT, 100, [101, CAP - 101], id="grown far over the limit: never more than the cap"),
    ],
)
def test_a_file_is_read_in_one_read_when_its_size_is_right_and_never_past_the_cap(
    length: int, size_hint: int, asked: list[int]
) -> None:
    data = bytes(range(256)) * (length // 256 + 1)
    stream = RecordedReads(data[:length])
    assert read_at_most(stream, size_hint, CAP) == data[: min(length, CAP)]
    assert stream.asked == asked


@pytest.mark.slow
def test_the_setting_reaches_a_real_run(model_env: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    small, large = photo_jpeg(64, 48), photo_jpeg(640, 480)
    (folder / "small.jpg").write_bytes(small)
    (folder / "large.jpg").write_bytes(large)
    assert len(small) < 20_000 < len(large)
    out = tmp_path / "out.jsonl"
    env = {**model_env, "IMAGEMILL_MAX_IMAGE_BYTES": "20000"}
    result = run_cli("annotate", str(folder), "--tasks", "moderation", "--out", str(out), "-q", env=env)
    assert result.returncode == 0, result.stderr
    kinds = {Path(r.uri).name: (r.error.kind if r.error else None) for r in read_records(out)}
    assert kinds == {"small.jpg": None, "large.jpg": "too_large"}


def test_what_a_read_returns_cannot_be_changed_afterwards(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"abc")
    blob = reader("http://127.0.0.1:1").read(ImageRef(uri=file_uri(path)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        blob.data = b"changed"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        parse_s3("s3://bucket/key").key = "other"  # type: ignore[misc]
