"""A bad IMAGEMILL_* value, in any command: exit 2 and one line per bad variable, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagemill.core.errors import UserError
from imagemill.core.settings import SettingsError, get_settings

REPO = Path(__file__).resolve().parents[1]


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
