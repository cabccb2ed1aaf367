"""S3 faults and odd keys, end to end: the real `imagemill annotate` in a subprocess, talking to
the moto S3 server through a fault-injecting HTTP proxy (tests/fixtures/faulty_s3.py).

Faults are real HTTP answers (503 SlowDown, 500, 403, a deleted object), never patched boto3, and
the proxy counts the attempts the client made.
"""

import json
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.client import BaseClient

from imagemill.core.schemas import Record
from imagemill.core.sinks.files import read_records
from tests.fixtures.cli import run_cli
from tests.fixtures.faulty_s3 import FaultyProxy, faulty_proxy
from tests.fixtures.images import photo_jpeg
from tests.fixtures.s3 import s3_client

pytestmark = pytest.mark.slow  # whole local runs against a fault-injecting S3 proxy

MAX_ATTEMPTS = 3  # IMAGEMILL_S3_MAX_ATTEMPTS in these runs: keeps the permanent-fault cases quick


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultyProxy]:
    with faulty_proxy(s3_endpoint) as running:
        yield running


@pytest.fixture
def moto(s3_endpoint: str) -> BaseClient:
    """A client straight to the S3 server, behind the proxy's back (setup, sabotage)."""
    return s3_client(s3_endpoint)


def upload(client: BaseClient, bucket: str, keys: list[str]) -> None:
    for seed, key in enumerate(keys):
        client.put_object(Bucket=bucket, Key=key, Body=photo_jpeg(64, 48, seed=seed))


def annotate(source: str, proxy: FaultyProxy, model_env: dict[str, str], tmp_path: Path) -> dict[str, Record]:
    """Run `imagemill annotate SOURCE` against the proxy; it must complete (exit 0)."""
    out = tmp_path / "out.jsonl"
    env = {**model_env, "IMAGEMILL_S3_ENDPOINT_URL": proxy.url, "IMAGEMILL_S3_MAX_ATTEMPTS": str(MAX_ATTEMPTS)}
    result = run_cli("annotate", source, "--tasks", "moderation", "--out", str(out), "-q", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    records = read_records(out)
    by_uri = {r.uri: r for r in records}
    assert len(by_uri) == len(records)  # one record per object
    return by_uri


def assert_annotated(record: Record) -> None:
    assert record.error is None, (record.uri, record.error)
    assert record.moderation is not None and set(record.moderation.scores) == {"normal", "nsfw"}


def gets(proxy: FaultyProxy, bucket: str, key: str) -> int:
    """GET requests the proxy saw for exactly this key."""
    return proxy.requests[("GET", f"/{bucket}/{key}")]


def test_throttling_and_5xx_answers_are_retried_until_every_object_is_annotated(
    proxy: FaultyProxy, moto: BaseClient, bucket: str, model_env: dict[str, str], tmp_path: Path
) -> None:
    calm = [f"photos/calm-{i}.jpg" for i in range(4)]
    upload(moto, bucket, [*calm, "photos/throttled-1.jpg", "photos/throttled-2.jpg", "photos/flaky.jpg"])
    slow_1 = proxy.add_rule(method="GET", key_contains="throttled-1", status=503, code="SlowDown", times=2)
    slow_2 = proxy.add_rule(method="GET", key_contains="throttled-2", status=503, code="SlowDown", times=2)
    flaky = proxy.add_rule(method="GET", key_contains="flaky", status=500, code="InternalError", times=1)

    records = annotate(f"s3://{bucket}/photos/", proxy, model_env, tmp_path)

    assert len(records) == 7
    for record in records.values():
        assert_annotated(record)
    assert (slow_1.hits, slow_2.hits, flaky.hits) == (2, 2, 1)
    assert gets(proxy, bucket, "photos/throttled-1.jpg") == 3  # two SlowDowns, then the object
    assert gets(proxy, bucket, "photos/throttled-2.jpg") == 3
    assert gets(proxy, bucket, "photos/flaky.jpg") == 2
    assert all(gets(proxy, bucket, key) == 1 for key in calm)


def test_a_permanent_access_denied_is_one_fetch_failed_record_and_is_not_retried(
    proxy: FaultyProxy, moto: BaseClient, bucket: str, model_env: dict[str, str], tmp_path: Path
) -> None:
    upload(moto, bucket, ["p/a.jpg", "p/secret.jpg", "p/b.jpg"])
    proxy.add_rule(method="GET", key_contains="secret", status=403, code="AccessDenied", times=None)

    records = annotate(f"s3://{bucket}/p/", proxy, model_env, tmp_path)

    denied = records[f"s3://{bucket}/p/secret.jpg"]
    assert denied.error is not None and denied.error.kind == "fetch_failed"
    assert "AccessDenied" in denied.error.message and "p/secret.jpg" in denied.error.message
    assert denied.moderation is None
    assert gets(proxy, bucket, "p/secret.jpg") == 1  # a 403 will not change: no retries
    assert_annotated(records[f"s3://{bucket}/p/a.jpg"])
    assert_annotated(records[f"s3://{bucket}/p/b.jpg"])


def test_a_permanent_503_is_fetch_failed_after_exactly_max_attempts_and_the_run_completes(
    proxy: FaultyProxy, moto: BaseClient, bucket: str, model_env: dict[str, str], tmp_path: Path
) -> None:
    upload(moto, bucket, ["p/a.jpg", "p/down.jpg", "p/b.jpg"])
    down = proxy.add_rule(method="GET", key_contains="down", status=503, code="ServiceUnavailable", times=None)

    records = annotate(f"s3://{bucket}/p/", proxy, model_env, tmp_path)

    failed = records[f"s3://{bucket}/p/down.jpg"]
    assert failed.error is not None and failed.error.kind == "fetch_failed"
    assert "ServiceUnavailable" in failed.error.message
    assert gets(proxy, bucket, "p/down.jpg") == down.hits == MAX_ATTEMPTS  # the first try included
    assert_annotated(records[f"s3://{bucket}/p/a.jpg"])
    assert_annotated(records[f"s3://{bucket}/p/b.jpg"])


def test_a_manifest_entry_for_a_missing_object_is_a_not_found_record_fetched_once(
    proxy: FaultyProxy, moto: BaseClient, bucket: str, model_env: dict[str, str], tmp_path: Path
) -> None:
    upload(moto, bucket, ["here.jpg"])
    manifest = tmp_path / "list.jsonl"
    uris = [f"s3://{bucket}/here.jpg", f"s3://{bucket}/gone.jpg"]
    manifest.write_text("".join(json.dumps({"uri": uri}) + "\n" for uri in uris))

    records = annotate(str(manifest), proxy, model_env, tmp_path)

    assert list(records) == uris
    assert_annotated(records[uris[0]])
    gone = records[uris[1]]
    assert gone.error is not None and gone.error.kind == "not_found" and "gone.jpg" in gone.error.message
    assert gets(proxy, bucket, "gone.jpg") == 1  # NoSuchKey is an answer, not a fault to retry


def test_an_object_deleted_between_listing_and_fetching_is_a_not_found_record(
    proxy: FaultyProxy, moto: BaseClient, bucket: str, model_env: dict[str, str], tmp_path: Path
) -> None:
    upload(moto, bucket, ["p/a.jpg", "p/vanishing.jpg", "p/b.jpg"])
    # the listing still shows it; the first GET of it deletes it in the server just before arriving
    race = proxy.add_rule(
        method="GET",
        key_contains="vanishing",
        times=1,
        before=lambda: moto.delete_object(Bucket=bucket, Key="p/vanishing.jpg"),
    )

    records = annotate(f"s3://{bucket}/p/", proxy, model_env, tmp_path)

    assert race.hits == 1
    vanished = records[f"s3://{bucket}/p/vanishing.jpg"]
    assert vanished.error is not None and vanished.error.kind == "not_found"
    assert vanished.etag  # it was listed (with its etag) before it went away
    assert gets(proxy, bucket, "p/vanishing.jpg") == 1
    assert_annotated(records[f"s3://{bucket}/p/a.jpg"])
    assert_annotated(records[f"s3://{bucket}/p/b.jpg"])


def test_a_throttled_listing_is_retried_and_every_object_is_found(
    proxy: FaultyProxy, moto: BaseClient, bucket: str, model_env: dict[str, str], tmp_path: Path
) -> None:
    keys = [f"p/{i}.jpg" for i in range(5)]
    upload(moto, bucket, keys)
    # the first attempt of *every* listing request is throttled (botocore numbers its attempts in
    # amz-sdk-request), so whichever pass lists (annotate also counts in a second, background pass)
    # finds nothing without retrying
    throttle = proxy.add_rule(
        method="GET",
        query_contains="list-type=2",
        header=("amz-sdk-request", "attempt=1"),  # attempts never reach 10 here
        status=503,
        code="SlowDown",
    )

    records = annotate(f"s3://{bucket}/p/", proxy, model_env, tmp_path)

    assert sorted(records) == sorted(f"s3://{bucket}/{key}" for key in keys)
    for record in records.values():
        assert_annotated(record)
    assert throttle.hits >= 1
    assert proxy.requests[("GET", f"/{bucket}")] > throttle.hits  # throttled, then retried


ODD_KEYS = [
    "odd/with space.jpg",
    "odd/фото/ü ñ.jpg",  # NFC
    "odd/фото/" + unicodedata.normalize("NFD", "ü ñ.jpg"),  # NFD: a different key, never merged
    "odd/a/../b.jpg",
    "odd/../../../etc/escape.jpg",
    "odd/./dot.jpg",
    "odd//double-slash.jpg",
    "odd/100%.jpg",
    "odd/literal%20not-a-space.jpg",
    "odd/plus+sign.jpg",
    "odd/query?x=1#fragment.jpg",
    "odd/back\\slash.jpg",
    "odd/" + "é" * 505 + ".jpg",  # 1018 bytes: near S3's 1024-byte limit, far over NAME_MAX
]


def test_odd_keys_are_opaque_s3_keys_never_filesystem_paths(
    proxy: FaultyProxy, bucket: str, model_env: dict[str, str], tmp_path: Path
) -> None:
    assert len(set(ODD_KEYS)) == len(ODD_KEYS) and len(ODD_KEYS[-1].encode()) == 1018
    upload(s3_client(proxy.url), bucket, ODD_KEYS)  # through the proxy too
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    env = {**model_env, "IMAGEMILL_S3_ENDPOINT_URL": proxy.url, "IMAGEMILL_S3_MAX_ATTEMPTS": str(MAX_ATTEMPTS)}
    result = run_cli(
        "annotate",
        f"s3://{bucket}/odd/",
        "--tasks",
        "moderation",
        "--out",
        "out.jsonl",
        "-q",
        env=env,
        cwd=cwd,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr

    lines = (cwd / "out.jsonl").read_text(encoding="utf-8").splitlines()
    uris = [json.loads(line)["uri"] for line in lines]
    assert sorted(u.encode() for u in uris) == sorted(f"s3://{bucket}/{k}".encode() for k in ODD_KEYS)
    for record in read_records(cwd / "out.jsonl"):
        assert_annotated(record)
    for key in ODD_KEYS:
        assert gets(proxy, bucket, key) == 1, key  # the exact key reached the server, once
    # nothing was written anywhere but the output file: no key was ever used as a path
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["cwd", "cwd/out.jsonl"]
    assert not (tmp_path.parent / "etc").exists()  # where cwd/odd/../../../etc/escape.jpg would land
