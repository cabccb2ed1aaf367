"""What `pip install imagemill` gives: one import name, one version, and a CLI that works without extras.

.ci/run also installs the built wheel, without extras, into a fresh virtual environment and runs it;
here the worker extra is taken away from a subprocess by a sitecustomize that blocks its modules.
"""

import email.parser
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import imagemill
from imagemill.cli.display import WORKER_EXTRA_MODULES
from tests.fixtures.cli import run_main

REPO = Path(__file__).resolve().parents[1]
HINT = "pip install 'imagemill[worker]'"


def imagemill_command() -> list[str]:
    """The installed console script (so the entry point is tested too), else `python -m imagemill`."""
    script = Path(sys.executable).with_name("imagemill")
    return [str(script)] if script.exists() else [sys.executable, "-m", "imagemill"]


@pytest.fixture
def without_worker_extra(tmp_path: Path) -> dict[str, str]:
    """Environment for a subprocess in which every module of the worker extra fails to import."""
    site = tmp_path / "no-worker-extra"
    site.mkdir()
    blocked = ", ".join(repr(name) for name in sorted(WORKER_EXTRA_MODULES))
    (site / "sitecustomize.py").write_text(
        f"import sys\nfor name in ({blocked},):\n    sys.modules[name] = None  # import raises ModuleNotFoundError\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGEMILL_")}
    return {
        **env,
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
        "COLUMNS": "200",
        "IMAGEMILL_BROKER_URL": "redis://127.0.0.1:1/0",
    }


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*imagemill_command(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_block_really_removes_the_worker_extra(without_worker_extra: dict[str, str], tmp_path: Path) -> None:
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], env=without_worker_extra, capture_output=True, text=True, timeout=60
    )
    assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr


def test_annotate_without_the_worker_extra_is_one_line_naming_it(
    without_worker_extra: dict[str, str], tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"not really a jpeg; the models are never reached")
    result = run(["annotate", str(photos), "--out", str(tmp_path / "out.jsonl"), "-q"], without_worker_extra, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and HINT in lines[0], result.stderr
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.slow
def test_the_rest_of_the_cli_works_without_the_worker_extra(
    without_worker_extra: dict[str, str], tmp_path: Path
) -> None:
    version = run(["--version"], without_worker_extra, tmp_path)
    assert (version.returncode, version.stdout.strip()) == (0, f"imagemill {imagemill.__version__}")
    helped = run(["--help"], without_worker_extra, tmp_path)
    assert helped.returncode == 0 and "annotate" in helped.stdout and "schedule" in helped.stdout
    # with no Redis to reach, each command still gets as far as saying so in one line
    for args in (["jobs"], ["status", "0123abcd"], ["schedule", "list"]):
        result = run(args, without_worker_extra, tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("error: ") and "Redis" in lines[0], (args, result.stderr)


# type-stub packages of the dev extra: only the type checker may read them (`if TYPE_CHECKING:` imports)
DEV_ONLY_STUBS = ("mypy_boto3_s3", "botocore_stubs", "types_s3transfer")


@pytest.mark.slow
def test_every_module_imports_without_the_dev_only_type_stubs(tmp_path: Path) -> None:
    site = tmp_path / "no-stubs"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import sys\nfor name in {DEV_ONLY_STUBS!r}:\n    sys.modules[name] = None\n"
    )
    probe = (
        "import importlib, pkgutil, imagemill\n"
        "names = [m.name for m in pkgutil.walk_packages(imagemill.__path__, 'imagemill.')]\n"
        "names = [name for name in names if not name.endswith('__main__')]  # that one runs the CLI\n"
        "assert len(names) > 50, names\n"
        "for name in names: importlib.import_module(name)\n"
        "print('imported', len(names))\n"
        "import mypy_boto3_s3\n"  # the block holds: this line must fail
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    last = done.stderr.strip().splitlines()[-1:]
    assert done.stdout.startswith("imported "), done.stderr[-2000:]
    assert last == ["ModuleNotFoundError: import of mypy_boto3_s3 halted; None in sys.modules"], done.stderr[-2000:]


def test_the_version_is_written_once() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "imagemill.__version__"}


def test_the_license_file_is_the_declared_license() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text


@pytest.mark.slow
def test_a_wheel_from_a_clean_tree_holds_only_the_imagemill_package(tmp_path: Path) -> None:
    # the files a clean checkout has (tracked, and new ones git does not ignore), so stale
    # build/ or egg-info folders of this working tree cannot leak into the wheel
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    tree = tmp_path / "tree"
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    out = tmp_path / "dist"
    # no build isolation: the setuptools of this environment, so the test needs no network
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(tree)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = out.glob("imagemill-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = f"imagemill-{imagemill.__version__}.dist-info"
        assert {name.split("/")[0] for name in names} == {"imagemill", dist_info}
        assert not [name for name in names if name.startswith(("imagemill/tests", "imagemill/bench"))]
        metadata = email.parser.Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
        assert f"{dist_info}/licenses/LICENSE" in names
    assert metadata["Version"] == imagemill.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "imagemill = imagemill.cli:main" in entry_points
    assert "imagemill/core/data/tags.txt" in names  # package data travels too


def test_worker_without_the_worker_extra_is_one_line_naming_it_and_starts_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # in this process (fast): the modules are hidden as the subprocess fixture hides them; .ci/run
    # runs the same command from a real bare install. Without the check, each Celery child died at
    # import ("Module 'imagemill.worker' has no attribute 'celery'") and was restarted 5 times
    for name in WORKER_EXTRA_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    for key in [key for key in os.environ if key.upper().startswith("IMAGEMILL_")]:
        monkeypatch.delenv(key)
    status_file = tmp_path / "worker.json"
    monkeypatch.setenv("IMAGEMILL_WORKER_STATUS_FILE", str(status_file))
    code, lines = run_main(["worker", "--gpus", "cpu"], monkeypatch, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and HINT in lines[0], lines
    assert not status_file.exists()  # the supervisor never ran
