"""`./imagemillw`: one command from a fresh clone to a first result, and the torch build it picks.

The slow test sets up a real environment once from a copy of the tree; the rest read the choice and the errors.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import imagemill
from tests.fixtures.images import photo_jpeg

REPO = Path(__file__).resolve().parents[1]
WRAPPER = "imagemillw"


@pytest.fixture(scope="module")
def setup_venv() -> Iterator[ModuleType]:
    """tools/setup_venv.py, the wrapper's set-up step, imported from its file (tools/ is no package)."""
    spec = importlib.util.spec_from_file_location("setup_venv", REPO / "tools" / "setup_venv.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["setup_venv"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["setup_venv"]


def clone(tmp_path: Path, only: tuple[str, ...] = ()) -> Path:
    """The files a fresh clone has (tracked, and new ones git does not ignore), with their modes."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", *only],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    tree = tmp_path / "clone"
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    return tree


def user_env(**extra: str) -> dict[str, str]:
    """A user's shell: nothing of this test run's Python environment (the tree's copy must stand alone)."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "COLUMNS": "200", **extra}


def run_wrapper(tree: Path, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tree / WRAPPER), *args], cwd=tree.parent, env=env, capture_output=True, text=True, timeout=timeout
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.slow
def test_one_command_sets_up_a_fresh_clone_then_starts_at_once_and_annotates(
    tmp_path: Path, model_env: dict[str, str]
) -> None:
    tree = clone(tmp_path)
    assert not (tree / ".venv").exists()
    # torch from pip's own sources, as .ci/run installs it: a test never downloads a CUDA build
    env = user_env(IMAGEMILLW_TORCH_INDEX_URL="")
    first = run_wrapper(tree, "--version", env=env, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout == f"imagemill {imagemill.__version__}\n"  # the set-up talks on stderr only
    assert "setting up" in first.stderr and "torch==2.13.0" in first.stderr, first.stderr[-3000:]
    assert (tree / ".venv" / "bin" / "imagemill").exists()

    # the second run needs neither Python nor pip: with no Python to set up with, it still starts;
    # the torch override given to the first run is remembered
    no_python = user_env(IMAGEMILLW_PYTHON=str(tmp_path / "no-such-python3"))
    second = run_wrapper(tree, "--version", env=no_python)
    assert (second.returncode, second.stdout, second.stderr) == (0, first.stdout, "")

    # the arguments reach imagemill untouched (a folder with a space), and its exit status comes back
    photos = tmp_path / "my photos"
    photos.mkdir()
    for seed in range(2):
        (photos / f"photo {seed}.jpg").write_bytes(photo_jpeg(64, 48, seed=seed))
    out = tmp_path / "annotations.jsonl"
    annotated = run_wrapper(tree, "annotate", str(photos), "--out", str(out), "-q", env={**env, **model_env})
    assert annotated.returncode == 0, annotated.stderr[-3000:]
    assert "setting up" not in annotated.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(r.get("error") is None and r["caption"]["text"] for r in records), records
    refused = run_wrapper(tree, "annotate", str(photos), "--tasks", "caption,ocr", env={**env, **model_env})
    assert refused.returncode == 2 and "unknown task ocr" in refused.stderr, refused.stderr

    # a changed pyproject.toml, or another torch override, sets up again (here it stops at once,
    # having no Python to do it with)
    project = tree / "pyproject.toml"
    kept = project.read_text()
    project.write_text(kept + "\n# a dependency changed\n")
    stale = run_wrapper(tree, "--version", env=no_python)
    assert stale.returncode == 2 and "IMAGEMILLW_PYTHON" in one_error_line(stale)
    project.write_text(kept)
    cu126 = run_wrapper(tree, "--version", env={**no_python, "IMAGEMILLW_TORCH_INDEX_URL": WHL + "cu126"})
    assert cu126.returncode == 2 and "IMAGEMILLW_PYTHON" in one_error_line(cu126)
    assert run_wrapper(tree, "--version", env=no_python).returncode == 0


def test_without_a_python_the_wrapper_says_so_in_one_line(tmp_path: Path) -> None:
    tree = clone(tmp_path, (WRAPPER, "pyproject.toml"))
    result = run_wrapper(tree, "--version", env=user_env(IMAGEMILLW_PYTHON=str(tmp_path / "python3")))
    assert result.returncode == 2 and result.stdout == ""
    assert "Python 3.11 or later" in one_error_line(result) and "IMAGEMILLW_PYTHON" in result.stderr


def an_old_python() -> str | None:
    """A Python older than 3.11 on this machine (pyenv's, or on PATH), if there is one."""
    pyenv = Path.home() / ".pyenv" / "versions"
    found = [str(path) for path in sorted(pyenv.glob("*/bin/python")) if re.match(r"(2|3\.\d|3\.10)\.", path.parts[-3])]
    found += filter(None, (shutil.which(name) for name in ("python3.10", "python3.9", "python2.7")))
    return found[0] if found else None


def a_python_that_says_it_is_3_9(folder: Path) -> str:
    """A stand-in for a machine without an old Python: answers `-V` as 3.9 does and fails the
    wrapper's version check as 3.9 would (its `sys.version_info < (3, 11)`)."""
    stand_in = folder / "python3.9"
    stand_in.write_text('#!/bin/sh\ncase "$1" in -V|--version) echo "Python 3.9.18";; *) exit 1;; esac\n')
    stand_in.chmod(0o755)
    return str(stand_in)


def test_an_old_python_is_named_in_one_line(tmp_path: Path) -> None:
    old = an_old_python() or a_python_that_says_it_is_3_9(tmp_path)
    tree = clone(tmp_path, (WRAPPER, "pyproject.toml"))
    result = run_wrapper(tree, "--version", env=user_env(IMAGEMILLW_PYTHON=old))
    assert result.returncode == 2 and not (tree / ".venv").exists()
    assert re.search(r"is Python [23]\.\d+\.\d+ and imagemill needs 3\.11 or later", one_error_line(result))


def test_a_python_without_ensurepip_is_told_to_install_python3_venv(tmp_path: Path) -> None:
    # Debian and Ubuntu ship venv's pip bootstrap in python3-venv: a python3 without it, as there
    blocker = tmp_path / "no-ensurepip"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['ensurepip'] = None\n")
    tree = clone(tmp_path, (WRAPPER, "pyproject.toml", "tools/setup_venv.py"))
    result = run_wrapper(tree, "--version", env=user_env(PYTHONPATH=str(blocker), IMAGEMILLW_PYTHON=sys.executable))
    assert result.returncode == 2 and "install python3-venv" in one_error_line(result)
    assert not (tree / ".venv").exists()


def test_the_wrapper_is_committed_executable() -> None:
    staged = subprocess.run(
        ["git", "ls-files", "--stage", "--", WRAPPER], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert staged.startswith("100755 "), f"{WRAPPER} is not committed with its executable bit: {staged!r}"


def test_the_wrapper_installs_the_torch_ci_tests_and_the_worker_image_ships(setup_venv: ModuleType) -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert f"pip install -q {setup_venv.TORCH}\n" in ci
    dockerfile = (REPO / "worker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    pins = (setup_venv.TORCH, setup_venv.TORCHVISION)
    assert pins == (f"torch=={args['TORCH_VERSION']}", f"torchvision=={args['TORCHVISION_VERSION']}")
    # an H100 with a CUDA 13 driver gets what the worker image has
    gpu = setup_venv.Gpu(driver_cuda=(13, 0), min_capability=(9, 0))
    choice = setup_venv.choose_torch(gpu, "Linux", {}, reachable=lambda url: True)
    assert choice.index_url == args["TORCH_INDEX_URL"]


H100_SMI = """
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.95.05              Driver Version: 580.95.05      CUDA Version: 13.0     |
|-----------------------------------------+------------------------+----------------------+
"""


def test_nvidia_smi_is_read_for_the_driver_cuda_version_and_the_oldest_gpu(setup_venv: ModuleType) -> None:
    assert setup_venv.parse_driver_cuda(H100_SMI) == (13, 0)
    assert setup_venv.parse_driver_cuda("NVIDIA-SMI has failed because it couldn't communicate") is None
    assert setup_venv.parse_min_capability("9.0\n6.1\n8.6\n") == (6, 1)
    assert setup_venv.parse_min_capability('Field "compute_cap" is not a valid field to query.\n') is None


CU130 = ["torch==2.13.0+cu130", "torchvision==0.28.0+cu130"]
CU126 = ["torch==2.13.0+cu126", "torchvision==0.28.0+cu126"]
WHL = "https://download.pytorch.org/whl/"


@pytest.mark.parametrize(
    ("driver_cuda", "capability", "requirements", "index", "warned"),
    [
        ((13, 0), (9, 0), CU130, WHL + "cu130", False),  # Hopper
        ((13, 2), None, CU130, WHL + "cu130", False),  # a driver that cannot say the capability
        ((13, 0), (6, 1), CU126, WHL + "cu126", False),  # Pascal: the CUDA 13 builds start at Turing
        ((12, 4), (8, 6), CU126, WHL + "cu126", False),  # a CUDA 12 driver runs the 12.6 build
        ((11, 8), (8, 0), ["torch==2.13.0+cpu"], WHL + "cpu", True),  # too old a driver for any CUDA build
        ((13, 0), (3, 7), ["torch==2.13.0+cpu"], WHL + "cpu", True),  # Kepler
    ],
)
def test_a_gpu_gets_the_cuda_build_its_driver_and_capability_run(
    setup_venv: ModuleType,
    driver_cuda: tuple[int, int],
    capability: tuple[int, int] | None,
    requirements: list[str],
    index: str,
    warned: bool,
) -> None:
    gpu = setup_venv.Gpu(driver_cuda, capability)
    choice = setup_venv.choose_torch(gpu, "Linux", {}, reachable=lambda url: True)
    assert (choice.requirements, choice.index_url, choice.warning is not None) == (requirements, index, warned)


def test_without_a_gpu_the_cpu_build(setup_venv: ModuleType) -> None:
    linux = setup_venv.choose_torch(None, "Linux", {}, reachable=lambda url: True)
    assert (linux.requirements, linux.index_url, linux.warning) == (["torch==2.13.0+cpu"], WHL + "cpu", None)
    # PyPI's torch for macOS is the CPU build already
    mac = setup_venv.choose_torch(None, "Darwin", {}, reachable=lambda url: True)
    assert (mac.requirements, mac.index_url) == (["torch==2.13.0"], None)


def test_offline_the_pin_comes_from_pips_own_index_and_a_gpu_is_warned(setup_venv: ModuleType) -> None:
    cpu = setup_venv.choose_torch(None, "Linux", {}, reachable=lambda url: False)
    assert (cpu.requirements, cpu.index_url, cpu.warning) == (["torch==2.13.0"], None, None)
    gpu = setup_venv.choose_torch(setup_venv.Gpu((13, 0), (9, 0)), "Linux", {}, reachable=lambda url: False)
    assert (gpu.requirements, gpu.index_url) == (["torch==2.13.0"], None)
    assert "IMAGEMILLW_TORCH_INDEX_URL" in gpu.warning


def test_the_torch_variables_override_the_choice_without_asking_the_network(setup_venv: ModuleType) -> None:
    def no_network(url: str) -> bool:
        raise AssertionError(f"asked {url}")

    gpu = setup_venv.Gpu((13, 0), (9, 0))
    env = {
        "IMAGEMILLW_TORCH": "torch==2.11.0  torchvision==0.26.0",
        "IMAGEMILLW_TORCH_INDEX_URL": "https://mirror/cu130",
    }
    mine = setup_venv.choose_torch(gpu, "Linux", env, reachable=no_network)
    assert (mine.requirements, mine.index_url) == (["torch==2.11.0", "torchvision==0.26.0"], "https://mirror/cu130")
    # empty: pip's own configuration alone (an offline mirror); the automatic requirements
    empty = {"IMAGEMILLW_TORCH_INDEX_URL": "", "IMAGEMILLW_TORCH": ""}
    configured = setup_venv.choose_torch(None, "Linux", empty, reachable=no_network)
    assert (configured.requirements, configured.index_url) == (["torch==2.13.0"], None)
