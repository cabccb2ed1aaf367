"""Shared fixtures: tiny models, test images, an S3 server, and the environment that ties them."""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.images import Case, write_mixed
from tests.fixtures.postgres import admin_url, fresh_database
from tests.fixtures.redis import RedisServer
from tests.fixtures.s3 import moto_server, s3_client
from tests.fixtures.tiny_models import build_tiny_models
from tests.fixtures.workers import WorkerProcess

# tests never reach the hub, and never read a developer's real AWS credentials
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)

# Fixtures that start or need services (a private redis-server, the PostgreSQL server, worker
# processes). A test that uses one is marked slow, so the fast tier (`pytest -m "not slow"`) needs
# nothing but Python; modules that are slow throughout say so with their own `pytestmark`.
SERVICE_FIXTURES = frozenset({"redis_server", "redis_url", "pg_url", "dist_env", "workers"})
# single heavy tests in modules that are otherwise fast (each ~10-20 s on a 2-core machine)
SLOW_TESTS = frozenset(
    {
        "tests/test_object_sinks.py::test_read_all_pages_through_more_than_a_thousand_objects",  # 1005 uploads
        "tests/test_models.py::test_model_threads_sleep_when_idle_instead_of_spinning_against_decoding",  # CPU use
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        in_service = SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if in_service or item.nodeid.partition("[")[0] in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def model_env(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """IMAGEMILL_* settings pointing at the tiny models; returned for subprocesses too. Local runs'
    rate samples go to the test's own file: `estimate` must not read other tests' runs."""
    env = {
        # beside the test's tmp_path, not in it: tests look at what a run leaves in their folders
        "IMAGEMILL_RATES_FILE": str(tmp_path_factory.mktemp("rates") / "rates.jsonl"),
        "IMAGEMILL_CAPTION_MODEL": str(tiny_models["caption"]),
        "IMAGEMILL_MODERATION_MODEL": str(tiny_models["moderation"]),
        "IMAGEMILL_TAGS_MODEL": str(tiny_models["tags"]),
        "IMAGEMILL_TAGS_THRESHOLD": "0",
        "IMAGEMILL_CAPTION_MAX_NEW_TOKENS": "6",
        "IMAGEMILL_BATCH_SIZE": "4",
        "IMAGEMILL_DEVICE": "cpu",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("IMAGEMILL_S3_ENDPOINT_URL", s3_endpoint)
    return s3_endpoint


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def mixed_folder(tmp_path: Path) -> tuple[Path, list[Case]]:
    folder = tmp_path / "photos"
    folder.mkdir()
    return folder, write_mixed(folder)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server for the whole run (the machine's shared one is never touched)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database on the private server for one test."""
    redis_server.client().flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database on the test PostgreSQL server for the whole run, dropped afterwards."""
    with fresh_database(admin_url()) as url:
        yield url


@pytest.fixture
def dist_env(model_env: dict[str, str], redis_url: str, s3_env: str, pg_url: str) -> dict[str, str]:
    """Environment for submit and workers: tiny models, private Redis, the S3 server, PostgreSQL."""
    return {
        **model_env,
        "IMAGEMILL_BROKER_URL": redis_url,
        "IMAGEMILL_S3_ENDPOINT_URL": s3_env,
        "IMAGEMILL_SINK": pg_url,
        "IMAGEMILL_VISIBILITY_TIMEOUT": "60",
    }


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Workers a test starts; all stopped at its end."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()
