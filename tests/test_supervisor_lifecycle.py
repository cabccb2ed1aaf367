"""The supervisor's children live and die with it, and a child that cannot start is not restarted forever.

Linux only for the first (PR_SET_PDEATHSIG); the supervisor module's docstring says what other
platforms need.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.fixtures.cli import REPO
from tests.fixtures.distributed import wait_for
from tests.fixtures.workers import start_worker

pytestmark = pytest.mark.slow  # real supervisors and Celery workers


def live_pids_in_group(pgid: int) -> list[int]:
    """Processes of a process group that are still alive (zombies, which are only waiting to be
    reaped, do not count)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sigkilled_supervisor_leaves_no_process_behind(
    model_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    worker = start_worker({**model_env, "IMAGEMILL_BROKER_URL": redis_url}, tmp_path / "worker.log").wait_ready()
    group = worker.process.pid  # start_worker starts a new session: the group is the supervisor's pid
    try:
        assert len(live_pids_in_group(group)) >= 3  # supervisor, Celery's main process, its pool process
        os.kill(worker.process.pid, signal.SIGKILL)  # the supervisor alone
        worker.process.wait()
        wait_for(lambda: live_pids_in_group(group) == [], 30, f"the children to die: {live_pids_in_group(group)}")
    finally:
        if live_pids_in_group(group):
            os.killpg(group, signal.SIGKILL)


SUPERVISE = textwrap.dedent(
    """
    import logging, sys
    from imagemill.core.gpus import Slot
    from imagemill.worker.supervisor import Supervisor
    logging.basicConfig(level=logging.INFO)
    env = dict(__import__("os").environ, IMAGEMILL_BATCH_SIZE="not a number")  # the child refuses to start
    sys.exit(Supervisor(slots=[Slot(None)], queues=["imagemill"], env=env, max_crashes=int(sys.argv[1])).run())
    """
)


def test_a_child_that_cannot_start_makes_the_supervisor_exit_non_zero_after_n_crashes(
    model_env: dict[str, str], redis_url: str
) -> None:
    env = {**os.environ, **model_env, "IMAGEMILL_BROKER_URL": redis_url, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", SUPERVISE, "3"], env=env, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired as exc:
        log = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        pytest.fail(f"the supervisor restarted a child that cannot start for 120 s:\n{(log or '')[-2000:]}")
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert proc.stderr.count("restarting in") == 2, proc.stderr[-3000:]  # the third exit ends it
    assert "3 times in a row" in proc.stderr and "giving up" in proc.stderr
    assert time.monotonic() - started < 120


def test_the_crash_limit_is_a_setting_five_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from imagemill.core.settings import Settings

    monkeypatch.setenv("IMAGEMILL_WORKER_MAX_CRASHES", "7")
    assert Settings().worker_max_crashes == 7
    monkeypatch.delenv("IMAGEMILL_WORKER_MAX_CRASHES")
    assert Settings().worker_max_crashes == 5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_check_is_the_probe_of_a_live_worker_and_its_broker(
    model_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    from tests.fixtures.cli import run_cli

    env = {**model_env, "IMAGEMILL_BROKER_URL": redis_url, "IMAGEMILL_WORKER_STATUS_FILE": str(tmp_path / "w.json")}
    before = run_cli("worker", "--check", env=env)
    assert before.returncode == 1 and "no worker status" in before.stderr
    worker = start_worker(env, tmp_path / "worker.log").wait_ready()
    group = worker.process.pid
    try:
        alive = run_cli("worker", "--check", env=env)
        assert alive.returncode == 0 and alive.stdout.strip() == "ok", alive.stderr
        assert run_cli("worker", "--ready", env=env).returncode == 0
        unreachable = run_cli("worker", "--ready", env={**env, "IMAGEMILL_BROKER_URL": "redis://127.0.0.1:1/0"})
        assert unreachable.returncode == 1 and "cannot reach Redis" in unreachable.stderr
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
        wait_for(lambda: live_pids_in_group(group) == [], 30, "the children to die")
        dead = run_cli("worker", "--check", env=env)
        assert dead.returncode == 1 and "is gone" in dead.stderr
    finally:
        if live_pids_in_group(group):
            os.killpg(group, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_two_workers_on_one_host_each_keep_their_own_status_file_and_the_probe_checks_every_running_one(
    model_env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    from tests.fixtures.cli import run_cli

    temp = tmp_path / "tmp"  # the temporary directory both workers and the probe share, as in one container
    temp.mkdir()
    env = {**model_env, "IMAGEMILL_BROKER_URL": redis_url, "IMAGEMILL_WORKER_TASKS": "moderation", "TMPDIR": str(temp)}
    first = start_worker(env, tmp_path / "first.log").wait_ready()
    second = start_worker(env, tmp_path / "second.log").wait_ready()
    try:

        def writers() -> dict[int, Path]:
            return {json.loads(path.read_text())["supervisor"]: path for path in temp.glob("imagemill-worker*.json")}

        wait_for(lambda: len(writers()) == 2, 30, f"a status file from each worker: {sorted(temp.iterdir())}")
        assert set(writers()) == {first.process.pid, second.process.pid}
        assert len(set(writers().values())) == 2
        both = run_cli("worker", "--check", env=env)
        assert both.returncode == 0 and both.stdout.strip() == "ok", both.stderr

        os.killpg(first.process.pid, signal.SIGKILL)  # its file is left behind; the second runs on
        first.process.wait()
        wait_for(lambda: live_pids_in_group(first.process.pid) == [], 30, "the first worker's children to die")
        survivor = run_cli("worker", "--check", env=env)
        assert survivor.returncode == 0, f"the dead worker's file was taken for the live one's: {survivor.stderr}"

        assert second.stop() == 0  # a worker that stops removes its own file: none runs now
        assert set(writers()) == {first.process.pid}
        none = run_cli("worker", "--check", env=env)
        assert none.returncode == 1 and "no imagemill worker runs" in none.stderr, none.stderr
    finally:
        for worker in (first, second):
            if live_pids_in_group(worker.process.pid):
                os.killpg(worker.process.pid, signal.SIGKILL)
