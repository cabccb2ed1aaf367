"""Security: TLS and passwords for Redis, JSON-only messages, secrets kept out of every output."""

import base64
from pathlib import Path

import pytest
from pydantic import ValidationError

from imagemill.core.jobs import JobRegistry, JobState
from imagemill.core.schemas import MAX_CHUNK_REFS, ChunkMessage
from tests.fixtures.cli import run_cli
from tests.fixtures.distributed import rows, submitted, upload_photos, wait_for
from tests.fixtures.redis import RedisServer, self_signed_cert
from tests.fixtures.workers import start_worker


class Exploit:
    """Unpickling this would create a file: proof that a payload was (not) deserialised."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_password_protected_tls_broker_runs_a_job_and_the_password_never_shows(
    model_env, s3_env, bucket, pg_url, workers, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis", password="tls-s3cret", tls_cert=self_signed_cert(tmp_path / "tls")).start()
    try:
        assert server.url.startswith("rediss://")
        env = {
            **model_env,
            "IMAGEMILL_BROKER_URL": server.url,
            "IMAGEMILL_S3_ENDPOINT_URL": s3_env,
            "IMAGEMILL_SINK": pg_url.replace("postgres@", "postgres:db-s3cret@"),
        }
        keys = upload_photos(s3_env, bucket, "tls/", 4)
        workers.append(start_worker(env, tmp_path / "worker.log").wait_ready())
        job_id = submitted(run_cli("submit", f"s3://{bucket}/tls/", "--tasks", "moderation", "--wait", env=env))
        assert len(rows(pg_url, job_id)) == len(keys)
        status = run_cli("status", job_id, env=env)
        outputs = status.stdout + status.stderr + workers[0].log
        assert "postgres@" in status.stdout  # the sink is shown, stored without its password
        assert "tls-s3cret" not in outputs and "db-s3cret" not in outputs
        assert "db-s3cret" not in str(rows(pg_url, job_id))
    finally:
        for worker in workers:
            worker.stop()
        workers.clear()
        server.stop()


def test_a_wrong_broker_password_is_one_clear_line(dist_env, tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", password="right-pass").start()
    try:
        url = server.url.replace("right-pass", "wrong-pass")
        result = run_cli("submit", str(tmp_path), env={**dist_env, "IMAGEMILL_BROKER_URL": url})
        assert result.returncode == 2 and "cannot reach Redis" in result.stderr
        assert "wrong-pass" not in result.stderr and "Traceback" not in result.stderr
    finally:
        server.stop()


def test_an_unreachable_broker_is_one_clear_line(dist_env, tmp_path: Path) -> None:
    env = {**dist_env, "IMAGEMILL_BROKER_URL": "redis://127.0.0.1:1/0"}
    result = run_cli("submit", str(tmp_path), env=env, timeout=60)
    assert result.returncode == 2 and "cannot reach Redis at redis://127.0.0.1:1/0" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_sink_url_is_one_clear_line(dist_env, tmp_path: Path) -> None:
    result = run_cli("submit", str(tmp_path), "--sink", "mysql://root:pw@db/x", env=dist_env)
    assert result.returncode == 2 and "expected postgresql://" in result.stderr and "Traceback" not in result.stderr


def test_a_pickle_payload_is_refused_counted_and_never_deserialised(dist_env, workers, tmp_path: Path) -> None:
    from imagemill.core.broker import CHUNK_TASK, make_celery
    from imagemill.core.settings import Settings

    marker = tmp_path / "pwned"
    workers.append(start_worker(dist_env, tmp_path / "worker.log").wait_ready())
    sender = make_celery(Settings(broker_url=dist_env["IMAGEMILL_BROKER_URL"]))
    sender.conf.accept_content = ["json", "pickle"]  # an attacker's producer, not ours
    sender.send_task(CHUNK_TASK, args=[Exploit(marker)], queue="imagemill", serializer="pickle")
    registry = JobRegistry(dist_env["IMAGEMILL_BROKER_URL"])
    wait_for(lambda: registry.rejected() >= 1, 30, "the refusal to be counted")
    assert not marker.exists()
    assert "refused a message of type application/x-python-serialize" in workers[0].log


def test_hostile_chunk_messages_fail_validation() -> None:
    ok = {"job_id": "j1", "chunk_id": "j1/000001", "tasks": ["tags"], "refs": [{"uri": "s3://b/k.jpg"}]}
    ChunkMessage.model_validate(ok)
    bad = [
        {**ok, "tasks": ["rm -rf"]},  # unknown task
        {**ok, "refs": [{"uri": "s3://b/k.jpg"}] * (MAX_CHUNK_REFS + 1)},  # oversize
        {**ok, "image_bytes": base64.b64encode(b"x").decode()},  # bytes never travel
        {**ok, "refs": "s3://b/k.jpg"},  # wrong shape
        {**ok, "job_id": "../../etc"},  # ids are never paths
    ]
    for message in bad:
        with pytest.raises(ValidationError):
            ChunkMessage.model_validate(message)


def test_sql_meta_characters_in_keys_are_data_not_sql(dist_env, bucket, pg_url, workers, tmp_path: Path) -> None:
    names = ["x'; DROP TABLE imagemill_records; --.jpg", 'q"uote\\.jpg']
    keys = upload_photos(dist_env["IMAGEMILL_S3_ENDPOINT_URL"], bucket, "sql/", 0, names)
    workers.append(start_worker(dist_env, tmp_path / "worker.log").wait_ready())
    job_id = submitted(run_cli("submit", f"s3://{bucket}/sql/", "--tasks", "moderation", "--wait", env=dist_env))
    assert sorted(r[0] for r in rows(pg_url, job_id)) == sorted(f"s3://{bucket}/{k}" for k in keys)
    assert JobRegistry(dist_env["IMAGEMILL_BROKER_URL"]).get(job_id).state == JobState.DONE
