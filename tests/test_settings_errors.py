"""A bad IMAGEMILL_* value, in any command: exit 2 and one line per bad variable, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from imagemill.cli import app
from imagemill.core.errors import UserError
from imagemill.core.settings import SettingsError, get_settings
from tests.fixtures.cli import run_main

REPO = Path(__file__).resolve().parents[1]
REDIS_FORM = "redis://[:password@]host[:port][/db] or rediss://… (TLS)"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.upper().startswith("IMAGEMILL_"):
            monkeypatch.delenv(key)
    return monkeypatch


def settings_error_lines(monkeypatch: pytest.MonkeyPatch, **env: str) -> list[str]:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as caught:
        get_settings()
    return str(caught.value).splitlines()


def test_a_settings_error_is_a_user_error_with_exit_code_2() -> None:
    assert issubclass(SettingsError, UserError) and SettingsError.exit_code == 2


def test_each_bad_variable_gets_one_line_naming_it_its_value_and_what_it_expects(
    clean_env: pytest.MonkeyPatch,
) -> None:
    lines = settings_error_lines(
        clean_env,
        IMAGEMILL_BATCH_SIZE="abc",
        IMAGEMILL_DTYPE="float8",
        IMAGEMILL_FETCH_THREADS="0",
        IMAGEMILL_TAGS_THRESHOLD="high",
        IMAGEMILL_WORKER_TASKS="caption,ocr",
        IMAGEMILL_MODERATION_THRESHOLDS='{"nsfw": "x", "gore": "y"}',
        IMAGEMILL_LOG_FORMAT="xml",
    )
    assert lines == [
        "IMAGEMILL_DTYPE='float8': expected one of 'auto', 'float32', 'float16' or 'bfloat16'",
        "IMAGEMILL_BATCH_SIZE='abc': expected an integer",
        """IMAGEMILL_MODERATION_THRESHOLDS='{"nsfw": "x", "gore": "y"}': """
        "nsfw: expected a number; gore: expected a number",
        "IMAGEMILL_TAGS_THRESHOLD='high': expected a number",
        "IMAGEMILL_FETCH_THREADS='0': expected a number of at least 1",
        "IMAGEMILL_WORKER_TASKS='caption,ocr': 'ocr': expected one of 'caption', 'moderation', 'tags' or 'embedding'",
        "IMAGEMILL_LOG_FORMAT='xml': expected one of 'text' or 'json'",
    ]


def test_json_that_does_not_parse_is_reported_with_the_other_bad_variables(clean_env: pytest.MonkeyPatch) -> None:
    # pydantic-settings alone stops at the first undecodable JSON value, naming no variable
    lines = settings_error_lines(clean_env, IMAGEMILL_ROUTES="{caption: gpu}", IMAGEMILL_CHUNK_SIZE="-1")
    assert lines == [
        'IMAGEMILL_ROUTES=\'{caption: gpu}\': expected a JSON object, e.g. {"key": "value"}',
        "IMAGEMILL_CHUNK_SIZE='-1': expected a number of at least 1",
    ]


def test_the_variable_is_shown_as_it_was_set(clean_env: pytest.MonkeyPatch) -> None:
    # names are case-insensitive, as pydantic-settings reads them
    assert settings_error_lines(clean_env, imagemill_queue_high_water="lots") == [
        "imagemill_queue_high_water='lots': expected an integer"
    ]


def test_a_refused_url_is_shown_without_its_password(clean_env: pytest.MonkeyPatch) -> None:
    lines = settings_error_lines(
        clean_env,
        IMAGEMILL_BROKER_URL="redis//:s3cret@localhost:6379/0",  # too malformed for the URL redaction to parse
        IMAGEMILL_REDIS_URL="redis://:s3cret@localhost:port/0",
    )
    assert lines == [
        "IMAGEMILL_BROKER_URL='***@localhost:6379/0': not a URL: expected " + REDIS_FORM,
        "IMAGEMILL_REDIS_URL='redis://:***@localhost:port/0': not a URL (its host or port): expected " + REDIS_FORM,
    ]


def test_connection_urls_need_a_supported_scheme_a_host_and_numbers_for_port_and_database(
    clean_env: pytest.MonkeyPatch,
) -> None:
    lines = settings_error_lines(
        clean_env,
        IMAGEMILL_S3_ENDPOINT_URL="ftp://s3.local",
        IMAGEMILL_BROKER_URL="amqp://rabbit:5672//",  # Celery could take it; imagemill's queues are Redis lists
        IMAGEMILL_REDIS_URL="redis://localhost:6379/jobs",
    )
    assert lines == [
        "IMAGEMILL_S3_ENDPOINT_URL='ftp://s3.local': the scheme 'ftp' is not supported: expected "
        "http://host[:port] or https://host[:port]",
        "IMAGEMILL_BROKER_URL='amqp://rabbit:5672//': the scheme 'amqp' is not supported: expected " + REDIS_FORM,
        "IMAGEMILL_REDIS_URL='redis://localhost:6379/jobs': the database 'jobs' is not a number: expected "
        + REDIS_FORM,
    ]
    clean_env.delenv("IMAGEMILL_S3_ENDPOINT_URL")
    clean_env.delenv("IMAGEMILL_REDIS_URL")
    assert settings_error_lines(clean_env, IMAGEMILL_BROKER_URL="redis:///0") == [
        "IMAGEMILL_BROKER_URL='redis:///0': no host: expected " + REDIS_FORM
    ]


def test_good_connection_urls_load_and_a_blank_optional_one_means_its_default(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("IMAGEMILL_BROKER_URL", "rediss://:p%40ss@redis.example:6380/2?ssl_cert_reqs=required")
    clean_env.setenv("IMAGEMILL_REDIS_URL", "")
    clean_env.setenv("IMAGEMILL_S3_ENDPOINT_URL", "http://[::1]:8333")
    settings = get_settings()
    assert settings.registry_url == settings.broker_url and settings.s3_endpoint_url == "http://[::1]:8333"


def test_good_settings_still_load(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("IMAGEMILL_ROUTES", '{"caption": "gpu"}')
    clean_env.setenv("IMAGEMILL_BATCH_SIZE", "8")
    settings = get_settings()
    assert settings.routes == {"caption": "gpu"} and settings.batch_size == 8


@pytest.mark.parametrize(
    "command",
    [
        ["annotate", "{photos}"],
        ["jobs"],
        ["status", "0123abcd"],
        ["submit", "{photos}", "--sink", "file:///tmp/x/"],
        ["schedule", "list"],
    ],
    ids=lambda command: command[0] if command[0] != "schedule" else "schedule-list",
)
def test_every_command_reports_two_bad_variables_in_two_lines(command: list[str], tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("IMAGEMILL_")}
    env |= {"IMAGEMILL_BATCH_SIZE": "abc", "IMAGEMILL_VISIBILITY_TIMEOUT": "soon", "COLUMNS": "200"}
    env["PYTHONPATH"] = str(REPO)
    args = [part.format(photos=photos) for part in command]
    result = subprocess.run(
        [sys.executable, "-m", "imagemill", *args], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: IMAGEMILL_BATCH_SIZE='abc': expected an integer",
        "error: IMAGEMILL_VISIBILITY_TIMEOUT='soon': expected an integer",
    ]


# Every command of `imagemill --help`, with arguments that get it past its own option checks; a new
# command must be added here (the test below compares this with the app's own list).
EVERY_COMMAND = {
    "annotate": ["annotate", "{tmp}"],
    "models download": ["models", "download"],
    "submit": ["submit", "{tmp}", "--sink", "file:///tmp/x/"],
    "status": ["status", "0123abcd"],
    "jobs": ["jobs"],
    "cancel": ["cancel", "0123abcd"],
    "retry": ["retry", "0123abcd"],
    "watch": ["watch", "sqs://uploads", "--sink", "postgresql://u@db/x"],
    "budget": ["budget", "0123abcd", "10"],
    "estimate": ["estimate", "{tmp}", "--tasks", "moderation"],
    "worker": ["worker", "--gpus", "cpu"],
    "schedule add": ["schedule", "add", "nightly", "{tmp}", "--sink", "postgresql://u@db/x"],
    "schedule list": ["schedule", "list"],
    "schedule remove": ["schedule", "remove", "nightly"],
    "beat": ["beat"],
    "review": ["review", "--sink", "postgresql://u@db/x"],
    "retag": ["retag", "{tmp}/records.jsonl", "--vocabulary", "{tmp}/tags.txt"],
    "export": ["export", "{tmp}/records.jsonl", "--format", "hf", "--out", "{tmp}/out"],
    "dedup": ["dedup", "{tmp}/records.jsonl", "--out", "{tmp}/groups.jsonl"],
    "score": ["score", "{tmp}/records.jsonl", "--head", "a={tmp}/head.safetensors", "--out", "{tmp}/o.jsonl"],
    "deploy keda": ["deploy", "keda", "{tmp}/keda-scaledobject.yaml"],
}
MALFORMED_URLS = [
    ("IMAGEMILL_BROKER_URL", "notaurl"),
    ("IMAGEMILL_BROKER_URL", "redis//localhost:6379/0"),
    ("IMAGEMILL_REDIS_URL", "notaurl"),
    ("IMAGEMILL_REDIS_URL", "redis//localhost:6379/0"),
    ("IMAGEMILL_S3_ENDPOINT_URL", "notaurl"),
]


def leaf_commands(command: Any, prefix: str = "") -> set[str]:
    # a group by its shape: Typer's click may be the click package or a copy vendored in typer
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        return {prefix.strip()}
    return {name for key, sub in subcommands.items() for name in leaf_commands(sub, f"{prefix}{key} ")}


def test_the_command_list_below_is_every_command_of_the_cli() -> None:
    assert set(EVERY_COMMAND) == leaf_commands(typer.main.get_command(app))


@pytest.mark.parametrize(("variable", "value"), MALFORMED_URLS, ids=lambda v: v.removeprefix("IMAGEMILL_"))
@pytest.mark.parametrize("command", list(EVERY_COMMAND))
def test_a_malformed_connection_url_is_one_line_naming_it_and_exit_2_in_every_command(
    command: str,
    variable: str,
    value: str,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    # nothing is started or connected to: the settings are refused before any work, so the worker
    # never falls back to Celery's default broker and beat never replaces this process
    clean_env.setenv(variable, value)
    code, lines = run_main([arg.format(tmp=tmp_path) for arg in EVERY_COMMAND[command]], clean_env, capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"error: {variable}={value!r}: not a URL: expected "), lines


@pytest.mark.parametrize("action", ["serve", "export"])
def test_the_review_apps_own_settings_are_checked_up_front_in_the_same_words(
    action: str, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # before: `review export` never read them, and `serve` named the sink first
    clean_env.setenv("IMAGEMILL_REVIEW_LEASE_S", "soon")
    clean_env.setenv("IMAGEMILL_REVIEW_AUDIT_RATE", "2")
    args = ["review", action, "--sink", "postgresql://u@db.invalid/x", "--out", str(tmp_path / "d.csv")]
    code, lines = run_main(args if action == "export" else args[:4], clean_env, capsys)
    assert (code, lines) == (
        2,
        [
            "error: IMAGEMILL_REVIEW_AUDIT_RATE='2': expected a number of at most 1.0",
            "error: IMAGEMILL_REVIEW_LEASE_S='soon': expected an integer",
        ],
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["imagemill", "worker", "--gpus", "cpu"],
        ["celery", "-A", "imagemill.worker", "worker"],  # the Celery apps, run directly, say the same
        ["celery", "-A", "imagemill.producer", "worker", "--beat"],
    ],
    ids=["imagemill-worker", "celery-worker", "celery-beat"],
)
def test_a_worker_with_a_malformed_broker_url_exits_2_and_never_starts_celery(
    command: list[str], tmp_path: Path
) -> None:
    # before: Celery read `redis//…` as a host name on its default transport and retried
    # amqp://guest@localhost:5672 forever, while `worker --check` kept passing
    status_file = tmp_path / "worker.json"
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("IMAGEMILL_")}
    env |= {
        "IMAGEMILL_BROKER_URL": "redis//localhost:6379/0",
        "IMAGEMILL_WORKER_STATUS_FILE": str(status_file),
        "PYTHONPATH": str(REPO),
        "COLUMNS": "200",
    }
    result = subprocess.run(
        [sys.executable, "-m", *command], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "error: IMAGEMILL_BROKER_URL='redis//localhost:6379/0': not a URL: "
        "expected redis://[:password@]host[:port][/db] or rediss://… (TLS)"
    ]
    assert not status_file.exists()  # no supervisor ever watched a Celery process
