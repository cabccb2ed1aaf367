"""Set up .venv for `./imagemillw`: the torch build that fits this machine, then imagemill[worker], editable.

Run by `./imagemillw` only when .venv is missing or older than pyproject.toml; it never runs imagemill itself.
"""

import importlib.util
import os
import platform
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The pins CI tests on the CPU (.ci/run) and the worker image ships for GPUs (worker/Dockerfile);
# tests/test_wrapper.py checks the three agree. torchvision brings the GPU JPEG decoder (nvjpeg).
TORCH = "torch==2.13.0"
TORCHVISION = "torchvision==0.28.0"
PYTORCH_INDEX = "https://download.pytorch.org/whl/"
# torch 2.13's CUDA builds (pytorch's RELEASE.md): CUDA 13.0 for Turing onwards (compute
# capability 7.5+), CUDA 12.6 for Maxwell to Hopper (5.0+). The driver must support the build's
# CUDA major version (minor versions are compatible). 13.2 is experimental there: asked for only.
CUDA_13_MIN_CAPABILITY = (7, 5)
CUDA_12_MIN_CAPABILITY = (5, 0)
TORCH_VARIABLE = "IMAGEMILLW_TORCH"
INDEX_VARIABLE = "IMAGEMILLW_TORCH_INDEX_URL"


@dataclass(frozen=True)
class Gpu:
    """What nvidia-smi says about the NVIDIA GPUs here."""

    driver_cuda: tuple[int, int]  # the newest CUDA version the driver supports
    min_capability: tuple[int, int] | None  # of the oldest GPU; None where the driver cannot say


@dataclass(frozen=True)
class TorchChoice:
    """The requirements installed before the project, and from where."""

    requirements: list[str]
    index_url: str | None  # pip's --index-url; None: pip's own configuration (its index, mirrors)
    build: str  # for the terminal: which build and why
    warning: str | None = None


class SetupError(Exception):
    """A step that failed: one line for the terminal, and the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def parse_driver_cuda(smi_output: str) -> tuple[int, int] | None:
    """The `CUDA Version: 13.0` of nvidia-smi's header."""
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", smi_output)
    return (int(found.group(1)), int(found.group(2))) if found else None


def parse_min_capability(query_output: str) -> tuple[int, int] | None:
    """The lowest of `nvidia-smi --query-gpu=compute_cap` (one `8.0` per GPU); None if it cannot say."""
    found = [(int(major), int(minor)) for major, minor in re.findall(r"^\s*(\d+)\.(\d+)\s*$", query_output, re.M)]
    return min(found) if found else None


def nvidia_gpu() -> Gpu | None:
    """The GPUs, if nvidia-smi is there and answers (a driver that is not loaded answers with an error)."""
    try:
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60)
        caps = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    cuda = parse_driver_cuda(header.stdout) if header.returncode == 0 else None
    if cuda is None:
        return None
    return Gpu(cuda, parse_min_capability(caps.stdout) if caps.returncode == 0 else None)


def cuda_build(gpu: Gpu) -> tuple[str | None, str]:
    """The PyTorch CUDA build for these GPUs (`cu130`, `cu126`), or None; and why."""
    cap = gpu.min_capability
    why = "the NVIDIA driver supports CUDA {}.{}".format(*gpu.driver_cuda)
    if cap is not None and cap < CUDA_12_MIN_CAPABILITY:
        return None, "GPU compute capability {}.{} is older than any CUDA build of {} supports".format(*cap, TORCH)
    if gpu.driver_cuda >= (13, 0) and (cap is None or cap >= CUDA_13_MIN_CAPABILITY):
        return "cu130", why
    if gpu.driver_cuda >= (12, 0):
        return "cu126", why if cap is None or cap >= CUDA_13_MIN_CAPABILITY else f"{why}; CUDA 13 builds need Turing on"
    return None, f"{why} only; the CUDA builds of {TORCH} need 12 or later: update the driver"


def automatic_torch(gpu: Gpu | None, system: str) -> TorchChoice:
    """The pinned torch, as the CUDA build for GPUs the driver can run, else the CPU build."""
    if gpu is None:
        why = "cpu build: no NVIDIA GPU answered nvidia-smi"
        if system != "Linux":  # PyPI's torch for macOS and Windows is the CPU build already
            return TorchChoice([TORCH], None, why)
        # PyPI's torch for Linux is a CUDA build (gigabytes): the CPU build is on PyTorch's index
        return TorchChoice([f"{TORCH}+cpu"], PYTORCH_INDEX + "cpu", why)
    cuda, why = cuda_build(gpu)
    if cuda is None:
        warning = f"{why}; installing the CPU build ({INDEX_VARIABLE} picks another)"
        return TorchChoice([f"{TORCH}+cpu"], PYTORCH_INDEX + "cpu", f"cpu build: {why}", warning)
    # the local labels (+cu130) make pip replace another build of the same version, such as a CPU torch
    return TorchChoice([f"{TORCH}+{cuda}", f"{TORCHVISION}+{cuda}"], PYTORCH_INDEX + cuda, f"{cuda} build: {why}")


def choose_torch(
    gpu: Gpu | None, system: str, env: Mapping[str, str], reachable: Callable[[str], bool] | None = None
) -> TorchChoice:
    """The automatic choice, unless IMAGEMILLW_TORCH (requirements, space-separated) or
    IMAGEMILLW_TORCH_INDEX_URL (empty: pip's own configuration alone) say otherwise; pip's own
    configuration too where PyTorch's index cannot be reached."""
    choice = automatic_torch(gpu, system)
    index, build, warning = choice.index_url, choice.build, choice.warning
    if INDEX_VARIABLE in env:
        index, warning = env[INDEX_VARIABLE] or None, None
        build += f"; {INDEX_VARIABLE}" if index else f"; pip's own index, as {INDEX_VARIABLE} is empty"
    elif index is not None and not (reachable or index_answers)(index):
        index, build = None, f"{build}; {PYTORCH_INDEX} cannot be reached, so from pip's own index"
        if gpu is not None and warning is None:
            warning = f"pip's own index may hold only a CPU build of torch ({INDEX_VARIABLE} names a CUDA wheel index)"
    # pip's own sources (an offline mirror, a folder of wheels) may hold any build of the pin, not the
    # labelled one, and may lack torchvision (only the GPU JPEG decoder needs it): the plain pin there
    requirements = choice.requirements if index is not None else [TORCH]
    if env.get(TORCH_VARIABLE, "").split():  # empty: the automatic choice
        requirements, build = env[TORCH_VARIABLE].split(), f"{TORCH_VARIABLE}; {build}"
    return TorchChoice(requirements, index, build, warning)


def index_answers(index_url: str) -> bool:
    """Whether the index's server answers, so that an offline machine turns to pip's configured sources at once."""
    try:
        with urllib.request.urlopen(urllib.request.Request(index_url + "/torch/", method="HEAD"), timeout=15):
            return True
    except urllib.error.HTTPError:
        return True  # it answered; pip says what is wrong
    except (OSError, ValueError):  # no name, no route, refused, timed out (URLError is an OSError)
        return False


def say(line: str) -> None:
    sys.stderr.write(f"imagemill: {line}\n")
    sys.stderr.flush()


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_works(venv: Path) -> bool:
    """An environment with a pip that runs (.ci/run's, the manual set-up's, an earlier run's) is kept."""
    python = venv_python(venv)
    return (
        python.exists() and subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True).returncode == 0
    )


def create_venv(venv: Path) -> None:
    """A new environment (or a repaired one: venv leaves what is there), with a current pip."""
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if made.returncode != 0:
        text = (made.stderr + made.stdout).strip()
        last = text.splitlines()[-1] if text else f"exit status {made.returncode}"
        raise SetupError(f"cannot create {venv}: {last}", 1)
    # the pip that comes with venv may be years old; a current one resolves and reports better
    pip_install(venv, ["--upgrade", "pip"])


def pip_install(venv: Path, args: Sequence[str]) -> None:
    """`pip install ARGS` in the environment; its output goes to stderr, so stdout stays imagemill's."""
    quiet = [] if sys.stderr.isatty() else ["--quiet"]  # progress for a person, few lines for a log
    command = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", *quiet, *args]
    done = subprocess.run(command, stdout=sys.stderr)
    if done.returncode != 0:
        raise SetupError(
            f"`pip install {' '.join(args)}` failed (exit status {done.returncode}; pip's messages are above)", 1
        )


def set_up(venv: Path) -> None:
    """Everything the first run does before imagemill starts (./imagemillw has checked the Python version)."""
    new = not venv_works(venv)
    if new and importlib.util.find_spec("ensurepip") is None:  # Debian and Ubuntu ship it apart, in python3-venv
        raise SetupError(
            f"{sys.executable} cannot create virtual environments (it has no ensurepip): install python3-venv "
            "(Debian, Ubuntu: apt install python3-venv), or set IMAGEMILLW_PYTHON to another Python",
            2,
        )
    say(f"setting up {venv} (the first run, or pyproject.toml changed); the next runs start at once")
    if new:
        create_venv(venv)
    choice = choose_torch(nvidia_gpu(), platform.system(), os.environ)
    if choice.warning:
        say(f"warning: {choice.warning}")
    source = f" from {choice.index_url}" if choice.index_url else ""
    say(f"installing {' '.join(choice.requirements)} ({choice.build}){source}")
    pip_install(venv, [*choice.requirements, *(["--index-url", choice.index_url] if choice.index_url else [])])
    say(f"installing imagemill[worker] from {ROOT} (editable: code changes need no reinstall)")
    pip_install(venv, ["--editable", f"{ROOT}[worker]"])


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: setup_venv.py VENV (./imagemillw runs it)\n")
        return 2
    try:
        set_up(Path(argv[0]))
    except SetupError as failed:
        sys.stderr.write(f"error: {failed}\n")
        return failed.code
    except KeyboardInterrupt:
        sys.stderr.write("error: setup interrupted; ./imagemillw sets up again on its next run\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
