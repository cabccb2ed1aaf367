"""Stores as context managers with Protocol capabilities, the one sink-option parser, the lazy S3 client."""

import os
from pathlib import Path

import pytest

from imagemill.core.errors import UserError
from imagemill.core.images import LazyS3Client
from imagemill.core.schemas import Record
from imagemill.core.settings import Settings
from imagemill.core.sinks import (
    IncrementalSink,
    KeyedSink,
    ReadableSink,
    SearchableSink,
    Sink,
    open_file_sink,
    open_sink,
)
from imagemill.core.sinks.files import RecordFileReader, read_records
from imagemill.core.sinks.objects import DirectorySink, ObjectStoreSink, split_format
from imagemill.core.sinks.options import split_options
from imagemill.core.sinks.postgres import PostgresSink, split_table
from imagemill.core.sinks.s3tags import ObjectTagsSink, parse_prefix


def record(uri: str, caption: str = "a dog") -> Record:
    return Record.model_validate(
        {"uri": uri, "etag": "e1", "signature": "sig", "caption": {"text": caption, "model": "m"}}
    )


# one parser for ?option= on every sink URL


def test_values_are_percent_decoded_and_plus_stays_a_plus() -> None:
    assert split_options("s3tags://?prefix=a%2Bb+c%3A", {"prefix"}) == ("s3tags://", {"prefix": "a+b+c:"})


def test_a_url_without_options_is_returned_as_it_is() -> None:
    assert split_options("s3://b/out/", {"format"}) == ("s3://b/out/", {})
    assert split_options("s3://b/out/?", {"format"}) == ("s3://b/out/", {})


def test_unknown_options_pass_through_byte_for_byte_when_asked() -> None:
    url = "postgresql://u@h/db?sslmode=require&table=t&options=-c%20search_path%3Dx+y&&application_name=a"
    base, options = split_options(url, {"table"}, pass_unknown=True)
    assert base == "postgresql://u@h/db?sslmode=require&options=-c%20search_path%3Dx+y&application_name=a"
    assert options == {"table": "t"}


def test_unknown_options_are_refused_by_name_with_what_is_accepted() -> None:
    with pytest.raises(UserError, match=r"unknown option bar, fmt; only \?format=jsonl\|parquet"):
        split_options("s3://b/o/?fmt=x&bar=1&fmt=y", {"format": "jsonl|parquet"})


@pytest.mark.parametrize(
    "url",
    ["s3://b/out/?format=jsonl&format=parquet", "file:///d/?format=jsonl&format=jsonl"],
)
def test_an_option_given_twice_is_refused(url: str) -> None:
    with pytest.raises(UserError, match=r"give \?format= once"):
        split_format(url)


def test_the_three_sinks_read_their_options_through_the_one_parser() -> None:
    assert split_format("s3://b/out/?format=PARQUET") == ("s3://b/out/", "parquet")
    with pytest.raises(UserError, match="format must be jsonl or parquet"):
        split_format("s3://b/out/?format=")
    assert split_table("postgresql://u@h/db?table=my_t&connect_timeout=3") == (
        "postgresql://u@h/db?connect_timeout=3",
        "my_t",
    )
    assert parse_prefix("s3tags://?prefix=img+") == "img+"


def test_option_errors_never_print_the_password() -> None:
    with pytest.raises(UserError) as caught:
        split_table("postgresql://alice:s3cretpw@h/db?table=a&table=b")
    assert "s3cretpw" not in str(caught.value) and "alice:***@" in str(caught.value)
    with pytest.raises(UserError) as unknown:
        split_format("s3://key:s3cretpw@bucket/out/?fmt=x")
    assert "s3cretpw" not in str(unknown.value)


# capabilities are Protocols, checked with isinstance


def test_each_store_has_exactly_the_capabilities_it_implements(tmp_path: Path) -> None:
    file_writer = open_file_sink(str(tmp_path / "out.jsonl"))
    sinks: list[Sink] = [
        file_writer,
        ObjectStoreSink("bucket", "out/"),
        DirectorySink(tmp_path),
        ObjectTagsSink(),
        PostgresSink("postgresql://u@127.0.0.1:1/db"),
    ]
    capabilities = [(isinstance(s, Sink), isinstance(s, KeyedSink), isinstance(s, SearchableSink)) for s in sinks]
    assert capabilities == [
        (True, True, False),
        (True, False, True),
        (True, False, True),
        (True, False, False),
        (True, True, True),
    ]
    assert isinstance(file_writer, IncrementalSink)
    assert not any(isinstance(s, IncrementalSink) for s in sinks[1:])
    # what RECORDS can name is read back by its own sink; a file being written is read by a reader of files
    assert [isinstance(s, ReadableSink) for s in sinks] == [False, True, True, False, True]
    assert isinstance(RecordFileReader(tmp_path / "out.jsonl"), ReadableSink)
    file_writer.abort()


def test_open_writer_gives_the_file_writer_for_a_path_and_refuses_an_unknown_scheme(tmp_path: Path) -> None:
    with open_sink(str(tmp_path / "out.parquet")) as writer:
        assert isinstance(writer, IncrementalSink)
    with pytest.raises(UserError, match=r"sink mysql://root:\*\*\*@db/x: expected postgresql://"):
        open_sink("mysql://root:pw@db/x")


# writers are context managers: close on success, abort on error


def test_a_file_writer_block_that_completes_replaces_the_earlier_file(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with open_file_sink(str(out)) as writer:
        writer.write([record("file:///a.jpg")])
    with open_file_sink(str(out), keep_existing=True) as writer:
        writer.keep(writer.existing_keys([("file:///a.jpg", "e1", "sig")]))
        writer.write([record("file:///b.jpg")])
    assert [r.uri for r in read_records(out)] == ["file:///a.jpg", "file:///b.jpg"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_a_sink_block_closes_its_s3_connections_and_a_later_use_opens_new_ones() -> None:
    sink = ObjectStoreSink("bucket", settings=Settings(s3_endpoint_url="http://127.0.0.1:1"))
    with sink:
        first = sink.client
        assert sink.client is first
    assert sink.client is not first
    with pytest.raises(ValueError, match="chunk name"), sink:
        sink.write([], "../escape")  # an error in the block still closes


# one S3 client per object and process


def test_the_lazy_client_is_made_once_and_never_shared_with_a_forked_child() -> None:
    lazy = LazyS3Client(Settings(s3_endpoint_url="http://127.0.0.1:1"))
    before = lazy.get()
    assert lazy.get() is before
    pid = os.fork()
    if pid == 0:  # the child: its own client, made once
        mine = lazy.get()
        os._exit(0 if mine is not before and lazy.get() is mine else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lazy.get() is before  # the parent keeps its own


def test_the_s3_users_share_the_provider_not_a_hand_made_client() -> None:
    settings = Settings(s3_endpoint_url="http://127.0.0.1:1")
    tags = ObjectTagsSink(settings=settings)
    assert tags.client is tags.client
    assert tags.client.meta.endpoint_url == "http://127.0.0.1:1"
