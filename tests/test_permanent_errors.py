"""Transient faults are retried with jittered backoff; permanent ones fail the job at once, with the reason.

A throttled or restarting service mends itself; a deleted bucket, a 403, bad credentials, a full
disk or a file the worker may not write do not, and retrying them only delays the failure.
"""

import errno
import json
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

from imagemill.core.jobs import JobRegistry, JobState
from imagemill.worker.retries import (
    ChunkTask,
    PermanentFault,
    backoff_s,
    classified,
    expected_backoff_s,
    permanent_reason,
)
from tests.fixtures.cli import run_cli
from tests.fixtures.distributed import submitted, upload_photos, wait_for
from tests.fixtures.s3 import s3_client
from tests.fixtures.workers import start_worker


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


@pytest.mark.parametrize(
    "exc",
    [
        client_error("SlowDown", 503),
        client_error("InternalError", 500),
        client_error("ServiceUnavailable", 503),
        client_error("RequestTimeout", 400),
        client_error("TooManyRequests", 429),
        client_error("SomethingUnlisted", 429),  # a 429 asks for a later try whatever its code
        EndpointConnectionError(endpoint_url="http://s3"),
        ReadTimeoutError(endpoint_url="http://s3"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        OSError(errno.ETIMEDOUT, "timed out"),
        psycopg.OperationalError("connection failed: server closed the connection unexpectedly"),
        redis.ConnectionError("Error 111 connecting to redis:6379. Connection refused."),
    ],
    ids=repr,
)
def test_transient_faults_are_retried(exc: Exception) -> None:
    assert permanent_reason(exc) is None
    assert classified(exc) is exc
    assert isinstance(exc, ChunkTask.autoretry_for)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (client_error("AccessDenied", 403), "AccessDenied"),
        (client_error("NoSuchBucket", 404), "NoSuchBucket"),
        (client_error("InvalidAccessKeyId", 403), "InvalidAccessKeyId"),
        (client_error("SignatureDoesNotMatch", 403), "SignatureDoesNotMatch"),
        # a 4xx in neither list is an answer about the request, not an outage: permanent by its status
        (client_error("InvalidArgument", 400), "InvalidArgument"),
        (client_error("MethodNotAllowed", 405), "MethodNotAllowed"),
        (client_error("", 400), "S3 400"),
        # past 429 too: of the 4xx statuses only 429 asks for a later try
        (client_error("", 451), "S3 451"),
        (client_error("", 499), "S3 499"),
        (NoCredentialsError(), "credentials"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
        (
            psycopg.OperationalError('connection failed: FATAL:  password authentication failed for user "x"'),
            "password authentication failed",
        ),
        (psycopg.OperationalError('FATAL:  database "gone" does not exist'), "does not exist"),
    ],
    ids=repr,
)
def test_permanent_faults_fail_at_once_with_the_reason(exc: Exception, reason: str) -> None:
    assert reason in (permanent_reason(exc) or "")
    fault = classified(exc)
    assert isinstance(fault, PermanentFault) and reason in str(fault)
    assert isinstance(fault, ChunkTask.dont_autoretry_for) and not isinstance(fault, ChunkTask.autoretry_for)


def test_backoff_is_jittered_and_the_default_retries_wait_about_ten_minutes() -> None:
    assert ChunkTask.retry_jitter is True
    assert ChunkTask.max_retries == 15
    assert 8 * 60 <= expected_backoff_s(ChunkTask.max_retries) <= 12 * 60


def test_an_s3_error_without_a_4xx_status_is_retried() -> None:
    # nothing says it is an answer about the request (a 4xx) rather than a broken exchange
    no_status = ClientError({"Error": {"Code": "Unexpected", "Message": "?"}}, "PutObject")
    assert permanent_reason(no_status) is None
    for status in (0, 304, 399):  # none, and under the 4xx range's first status
        assert permanent_reason(client_error("Unexpected", status)) is None, status


def test_each_pause_bound_doubles_from_two_seconds_up_to_two_minutes() -> None:
    assert backoff_s(9) == [2, 4, 8, 16, 32, 64, 120, 120, 120]
    assert (ChunkTask.retry_backoff, ChunkTask.retry_backoff_max) == (2, 120)


@pytest.mark.slow
def test_a_sink_bucket_deleted_mid_job_fails_the_job_quickly_with_the_reason(
    dist_env, bucket, workers, tmp_path: Path
) -> None:
    endpoint = dist_env["IMAGEMILL_S3_ENDPOINT_URL"]
    upload_photos(endpoint, bucket, "in/", 18)
    sink_bucket = f"sink-{uuid.uuid4().hex[:10]}"
    s3 = s3_client(endpoint)
    s3.create_bucket(Bucket=sink_bucket)
    env = {
        **dist_env,
        "IMAGEMILL_SINK": f"s3://{sink_bucket}/out/",
        "IMAGEMILL_TEST_FAULTS": json.dumps({"sleep_per_image_s": 0.3}),
    }
    workers.append(start_worker(env, tmp_path / "worker.log").wait_ready())
    job_id = submitted(run_cli("submit", f"s3://{bucket}/in/", "--tasks", "moderation", "--chunk-size", "3", env=env))
    registry = JobRegistry(env["IMAGEMILL_BROKER_URL"])
    wait_for(lambda: registry.get(job_id).chunks_done >= 1, 120, "a first chunk written")
    delete_bucket_while_written(s3, sink_bucket)
    deleted = time.monotonic()
    wait_for(lambda: registry.state(job_id) != JobState.RUNNING, 60, "the job to end")
    assert time.monotonic() - deleted < 30
    job = registry.get(job_id)
    assert job.state == JobState.FAILED and "NoSuchBucket" in (job.error or "")
    status = run_cli("status", job_id, env=env)
    assert "failed" in status.stdout and "NoSuchBucket" in status.stdout
    assert "Retry in" not in workers[0].log


def delete_bucket_while_written(s3: Any, name: str) -> None:
    """Empty the bucket and delete it; the worker keeps writing chunk objects meanwhile, so one that
    lands between the listing and the delete (BucketNotEmpty) means emptying it once more."""
    for _ in range(20):
        for entry in s3.list_objects_v2(Bucket=name).get("Contents", []):
            s3.delete_object(Bucket=name, Key=entry["Key"])
        try:
            s3.delete_bucket(Bucket=name)
            return
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "BucketNotEmpty":
                raise
    raise AssertionError(f"bucket {name} kept receiving objects through 20 deletes")
