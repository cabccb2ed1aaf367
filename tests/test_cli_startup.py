"""`imagemill --help` and `--version` answer at once: printing help loads none of the heavy libraries
the commands use (the broker, the object store and database drivers, the array and model libraries,
pydantic's settings and schemas); each command imports those when it runs.

Timing is measured, not asserted here: a loop of ten `python -m imagemill --help` takes about 0.2 s a run.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the top-level packages that printing help or the version must not import
HEAVY = frozenset(
    {
        "celery", "kombu", "redbeat", "redis",  # the broker
        "boto3", "botocore", "psycopg", "pyarrow",  # object storage, PostgreSQL, record files
        "numpy", "PIL", "torch", "transformers",  # images and models
        "pydantic", "pydantic_settings",  # settings and schemas
    }
)  # fmt: skip
LOADED = """
import runpy, sys
sys.argv = ["imagemill", *sys.argv[1:]]
try:
    runpy.run_module("imagemill", run_name="__main__")
except SystemExit:
    pass
print(" ".join(sorted({name.partition(".")[0] for name in sys.modules})), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"]], ids=["help", "version"])
def test_help_and_version_import_no_heavy_library(args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", LOADED, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip(), result.stderr  # it did print the help or the version
    loaded = set(result.stderr.strip().splitlines()[-1].split())
    assert "imagemill" in loaded and "typer" in loaded
    assert sorted(loaded & HEAVY) == []
