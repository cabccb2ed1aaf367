"""Sources: folders, S3 prefixes and manifests list image references lazily and completely."""

import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagemill.core.errors import SourceError
from imagemill.core.images import file_uri
from imagemill.core.settings import Settings
from imagemill.pipeline.sources import DirectorySource, ManifestSource, S3Source, open_source
from tests.fixtures.faulty_s3 import faulty_proxy
from tests.fixtures.s3 import s3_client


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_directory_lists_images_recursively_with_any_case_extension(tmp_path: Path) -> None:
    wanted = [touch(tmp_path / "a.jpg"), touch(tmp_path / "sub/b.PNG"), touch(tmp_path / "sub/deep/c.JpEg")]
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "sub/.DS_Store")
    uris = [ref.uri for ref in DirectorySource(tmp_path).refs()]
    assert sorted(uris) == sorted(file_uri(p) for p in wanted)


def test_directory_refs_carry_size_and_a_stable_etag(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg", b"12345")
    first = next(DirectorySource(tmp_path).refs())
    again = next(DirectorySource(tmp_path).refs())
    assert first.size == 5 and first.etag and first.etag == again.etag


def test_symlink_loops_are_listed_once_and_terminate(tmp_path: Path) -> None:
    touch(tmp_path / "a/photo.jpg")
    os.symlink(tmp_path, tmp_path / "a/loop")
    os.symlink(tmp_path / "a", tmp_path / "a/self")
    uris = [ref.uri for ref in DirectorySource(tmp_path).refs()]
    assert uris == [file_uri(tmp_path / "a/photo.jpg")]


def test_directory_listing_is_lazy(tmp_path: Path) -> None:
    for i in range(50):
        touch(tmp_path / f"d{i:02}/x.jpg")
    refs = DirectorySource(tmp_path).refs()
    assert next(refs).uri.endswith("d00/x.jpg")
    # folders are read as the listing is consumed: ones removed after the first ref never appear,
    # where a listing made up front would still yield all 49 of them
    for i in range(1, 50):
        shutil.rmtree(tmp_path / f"d{i:02}")
    assert list(refs) == []


def test_directory_yields_its_first_ref_before_an_endless_tree_is_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tree that never ends (os.walk replaced by an endless one): a listing made up front never returns."""
    touch(tmp_path / "x.jpg")
    walked: list[int] = []

    def endless_walk(root: str, followlinks: bool = False) -> Iterator[tuple[str, list[str], list[str]]]:
        for depth in itertools.count():
            walked.append(depth)
            if len(walked) > 1000:
                raise AssertionError("the listing walked the tree up front")
            yield str(root), [], ["x.jpg"]

    monkeypatch.setattr(os, "walk", endless_walk)
    refs = DirectorySource(tmp_path).refs()
    assert next(refs).uri == file_uri(tmp_path / "x.jpg")
    assert len(walked) == 1


def test_manifests_mix_local_paths_and_s3_uris(tmp_path: Path) -> None:
    touch(tmp_path / "local.jpg")
    lines = ["local.jpg", "s3://bucket/key with space.jpg", file_uri(tmp_path / "local.jpg")]
    (tmp_path / "m.txt").write_text("# comment\n" + "\n".join(lines) + "\n\n")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"uri": u, "note": 1}) for u in lines))
    (tmp_path / "m.csv").write_text("id,uri\n" + "\n".join(f'{i},"{u}"' for i, u in enumerate(lines)))
    expected = [file_uri(tmp_path / "local.jpg"), "s3://bucket/key with space.jpg", file_uri(tmp_path / "local.jpg")]
    for name in ("m.txt", "m.jsonl", "m.csv"):
        assert [r.uri for r in ManifestSource(tmp_path / name).refs()] == expected, name


def test_a_bad_manifest_line_is_listed_as_itself_and_the_listing_goes_on(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"uri": "a.jpg"}\n{not json}\n{"uri": "b.jpg"}\n')
    refs = list(ManifestSource(tmp_path / "bad.jsonl").refs())
    assert [r.uri for r in refs] == [
        file_uri(tmp_path / "a.jpg"),
        f"manifest:{file_uri(tmp_path / 'bad.jsonl')}#L2",
        file_uri(tmp_path / "b.jpg"),
    ]
    assert refs[1].problem and refs[1].problem.startswith("not JSON")
    (tmp_path / "bad.csv").write_text("name,size\na,1\n")  # neither a uri column nor only one column
    with pytest.raises(SourceError, match="no 'uri' column"):
        list(ManifestSource(tmp_path / "bad.csv").refs())


def test_open_source_explains_what_is_wrong(tmp_path: Path) -> None:
    settings = Settings()
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "missing"), settings)
    touch(tmp_path / "photo.jpg")
    with pytest.raises(SourceError, match="not a manifest"):
        open_source(str(tmp_path / "photo.jpg"), settings)
    with pytest.raises(SourceError, match="no bucket"):
        open_source("s3://", settings)


def test_s3_prefix_is_paged_and_filtered(s3_endpoint: str, bucket: str) -> None:
    client = s3_client(s3_endpoint)
    keys = [f"in/{i:03}.jpg" for i in range(7)] + ["in/odd key ü %20 ../x.JPG"]
    for key in [*keys, "in/readme.md", "in/folder/", "out/1.jpg"]:
        client.put_object(Bucket=bucket, Key=key, Body=b"data")
    with faulty_proxy(s3_endpoint) as proxy:
        source = S3Source(bucket, "in/", s3_client(proxy.url), page_size=3)
        refs = list(source.refs())
        # 11 keys under in/, 3 a page: the server answered four listing requests
        assert proxy.count("GET", f"/{bucket}") == 4
    assert sorted(r.uri for r in refs) == sorted(f"s3://{bucket}/{k}" for k in keys)
    assert all(r.size == 4 and r.etag for r in refs)


def test_s3_listing_is_lazy_one_page_at_a_time(s3_endpoint: str, bucket: str) -> None:
    client = s3_client(s3_endpoint)
    for i in range(9):
        client.put_object(Bucket=bucket, Key=f"in/{i}.jpg", Body=b"data")
    pages: list[str] = []
    client.meta.events.register("before-call.s3.ListObjectsV2", lambda **_: pages.append("page"))
    refs = S3Source(bucket, "in/", client, page_size=3).refs()
    assert next(refs).uri == f"s3://{bucket}/in/0.jpg"
    assert len(pages) == 1  # the first ref comes from the first page, before the rest are listed
    assert len(list(refs)) == 8 and len(pages) == 3


def test_missing_bucket_is_a_source_error(s3_endpoint: str) -> None:
    source = S3Source("no-such-bucket-here", "", s3_client(s3_endpoint))
    with pytest.raises(SourceError, match="NoSuchBucket"):
        list(source.refs())
