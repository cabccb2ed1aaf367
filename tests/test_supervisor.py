"""GPU pinning: which worker processes run, what each sees, and that a dead one comes back."""

import os
import re
import signal
import time
from pathlib import Path

import pytest

from imagemill.core.gpus import Slot, plan_slots
from imagemill.worker.supervisor import celery_argv
from tests.fixtures.workers import start_worker


def test_cpu_means_one_worker_that_sees_no_gpu() -> None:
    slots = plan_slots("cpu", detect=lambda: ["0", "1"])
    assert len(slots) == 1
    env = slots[0].env({"IMAGEMILL_DEVICE": "auto"})
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["IMAGEMILL_DEVICE"] == "auto"


def test_all_means_one_worker_per_detected_gpu_each_pinned_to_its_own() -> None:
    slots = plan_slots("all", detect=lambda: ["0", "1", "3"])
    envs = [slot.env({}) for slot in slots]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "3"]
    assert all(e["IMAGEMILL_DEVICE"] == "cuda:0" for e in envs)  # each child sees one GPU as cuda:0
    assert [slot.name for slot in slots] == ["gpu0", "gpu1", "gpu3"]


def test_listed_gpus_are_used_as_given() -> None:
    assert [s.gpu for s in plan_slots("0,2", detect=list)] == ["0", "2"]


@pytest.mark.parametrize("spec", ["", "gpu0", "0,0", "1,-2"])
def test_bad_gpu_lists_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="--gpus"):
        plan_slots(spec, detect=lambda: ["0"])


def test_all_without_gpus_says_to_use_cpu() -> None:
    with pytest.raises(ValueError, match="--gpus cpu"):
        plan_slots("all", detect=list)


def test_each_worker_runs_one_model_set_with_a_unique_hostname() -> None:
    argv = celery_argv(Slot("2"), ["imagemill", "captions"], "INFO", hostname="box")
    joined = " ".join(argv)
    assert "-A imagemill.worker worker" in joined and "--queues imagemill,captions" in joined
    assert "--hostname gpu2@box" in joined and "--concurrency 1" in joined and "--prefetch-multiplier 1" in joined


def test_the_parent_never_imports_torch() -> None:
    import subprocess
    import sys

    code = "import imagemill.cli, imagemill.worker.supervisor, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_worker_process_that_dies_is_restarted(model_env: dict[str, str], redis_url: str, tmp_path: Path) -> None:
    worker = start_worker({**model_env, "IMAGEMILL_BROKER_URL": redis_url}, tmp_path / "worker.log").wait_ready()
    try:
        first = re.search(r"started (cpu\d+) \(pid (\d+)\)", worker.log)
        assert first, worker.log
        os.kill(int(first.group(2)), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(re.findall(r"started cpu\d+ \(pid", worker.log)) < 2:
            time.sleep(0.2)
        assert "exited with -9; restarting" in worker.log
        assert len(re.findall(r"started cpu\d+ \(pid", worker.log)) == 2
    finally:
        assert worker.stop() == 0


def test_a_worker_not_ready_in_time_is_stopped_not_left_running(
    model_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    worker = start_worker({**model_env, "IMAGEMILL_BROKER_URL": redis_url}, tmp_path / "worker.log")
    with pytest.raises(RuntimeError, match="not ready after"):
        worker.wait_ready(timeout=0.2)  # far less than loading the models takes
    assert worker.process.poll() is not None  # stopped by wait_ready itself


def test_the_probe_passes_over_a_status_file_whose_supervisor_is_gone_or_whose_pid_was_reused(tmp_path: Path) -> None:
    """Without IMAGEMILL_WORKER_STATUS_FILE each supervisor writes <tmp>/imagemill-worker-<host>-<pid>.json;
    a file left by one that is gone (SIGKILL, a container restarted in the same pod) is not a
    running worker, even when its pid now names another process."""
    import json

    from imagemill.worker.supervisor import _start_time, check_all_alive, own_status_file

    me = os.getpid()  # alive: this test process stands in for a supervisor and its only child
    mine = own_status_file(me, "box", tmp_path)
    assert mine != own_status_file(me + 1, "box", tmp_path) and mine != own_status_file(me, "other", tmp_path)

    def write(started: int | None) -> None:
        status = {"supervisor": me, "started": started, "children": [me], "at": time.time()}
        mine.write_text(json.dumps(status))

    write(started=_start_time(me))
    assert check_all_alive("box", tmp_path) is None
    assert "no imagemill worker runs" in (check_all_alive("other", tmp_path) or "")  # another host's file
    write(started=(_start_time(me) or 0) - 1)  # the pid's process started later than the file's writer
    assert "no imagemill worker runs" in (check_all_alive("box", tmp_path) or "")
