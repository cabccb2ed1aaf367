"""GPU pinning: one Celery worker process per GPU, `CUDA_VISIBLE_DEVICES` set before it starts.

This parent never imports torch, so CUDA is never initialised in a process that forks; it
restarts children that die and forwards SIGTERM for a graceful (soft) shutdown.

Children die with it: on Linux each is started with PR_SET_PDEATHSIG (SIGKILL), so a supervisor
that is SIGKILLed or crashes takes its Celery workers along (their own pool processes already
die with them: Celery sets the same for its prefork children). Elsewhere (macOS) there is no such
call: run it under a process manager that stops the whole process group. A child that keeps
dying at start (WORKER_MAX_CRASHES times in a row, each within HEALTHY_AFTER_S of its start)
makes the supervisor stop the others and exit non-zero, so an orchestrator sees the failure.
"""

import ctypes
import ctypes.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

from imagemill.core.gpus import Slot
from imagemill.core.logs import as_json_line

log = logging.getLogger(__name__)
_RELAY_LOCK = threading.Lock()

RESTART_BACKOFF_S = (1, 2, 5, 10, 30)
# a child that ran this long was healthy: its exit starts a new count of crashes in a row
HEALTHY_AFTER_S = 60.0
CRASHED = 1  # the supervisor's exit status when a child crash-loops
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# what `imagemill worker --check` reads: the supervisor rewrites it while it watches its children
STATUS_EVERY_S = 5.0
STATUS_STALE_S = 30.0
# without IMAGEMILL_WORKER_STATUS_FILE each supervisor writes its own: <tempdir>/imagemill-worker-<host>-<pid>.json
STATUS_PREFIX = "imagemill-worker-"


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get SIGKILL when this process dies (Linux prctl
    PR_SET_PDEATHSIG); None where the platform has no such call."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        # runs in the child between fork and exec: only async-signal-safe work
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:  # the parent died before the call took effect
            os._exit(127)

    return preexec


def celery_argv(
    slot: Slot, queues: Sequence[str], loglevel: str, hostname: str | None = None, quiet: bool = False
) -> list[str]:
    """One model set per process: a single prefork child, prefetching one chunk at a time.

    Task events are on (Flower, celery-exporter); `quiet` drops the start-up banner (JSON logs)."""
    host = hostname or socket.gethostname()
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "imagemill.worker",
        *(["--quiet"] if quiet else []),
        "worker",
        "--queues",
        ",".join(queues),
        "--hostname",
        f"{slot.name}@{host}",
        "--concurrency",
        "1",
        "--pool",
        "prefork",
        "--prefetch-multiplier",
        "1",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "--task-events",
    ]


@dataclass
class Child:
    slot: Slot
    process: subprocess.Popen[bytes]
    started: float
    restarts: int = 0  # quick exits in a row before this start
    relays: list[threading.Thread] = field(default_factory=list)  # its output, as JSON lines, to ours


def relay_json_lines(source: IO[bytes], sink: TextIO, stream: str, pid: int) -> None:
    """Copy a child's output to ours line by line, each line JSON: Celery prints a few lines past
    logging (`worker: Warm shutdown (MainProcess)`), and a crashing library may too."""
    for raw in source:
        line = as_json_line(raw.decode("utf-8", errors="replace"), stream, pid)
        if line is not None:
            with _RELAY_LOCK:
                sink.write(line + "\n")
                sink.flush()
    source.close()


@dataclass
class Supervisor:
    """Runs one Celery worker per slot and keeps them running until told to stop."""

    slots: list[Slot]
    queues: list[str]
    loglevel: str = "INFO"
    quiet: bool = False  # no Celery banner (JSON logs)
    json_lines: bool = False  # IMAGEMILL_LOG_FORMAT=json: the children's every output line reaches ours as JSON
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    max_crashes: int = 5  # IMAGEMILL_WORKER_MAX_CRASHES
    children: list[Child] = field(default_factory=list)
    stopping: bool = False
    failed: bool = False  # a child crash-looped: the run ends with CRASHED
    status_file: Path | None = None  # IMAGEMILL_WORKER_STATUS_FILE: liveness for `imagemill worker --check`
    _status_written: float = 0.0

    def start(self) -> None:
        self.children = [self._spawn(slot) for slot in self.slots]

    def _spawn(self, slot: Slot, restarts: int = 0) -> Child:
        argv = celery_argv(slot, self.queues, self.loglevel, quiet=self.quiet)
        piped = subprocess.PIPE if self.json_lines else None
        process = subprocess.Popen(
            argv, env=slot.env(self.env), preexec_fn=die_with_parent(), stdout=piped, stderr=piped
        )
        log.info("started %s (pid %d): %s", slot.name, process.pid, " ".join(argv[3:]))
        child = Child(slot, process, time.monotonic(), restarts)
        if self.json_lines:
            for source, sink, stream in (
                (process.stdout, sys.stdout, "stdout"),
                (process.stderr, sys.stderr, "stderr"),
            ):
                assert source is not None  # piped above
                relay = threading.Thread(
                    target=relay_json_lines,
                    args=(source, sink, stream, process.pid),
                    name=f"relay-{stream}",
                    daemon=True,
                )
                relay.start()
                child.relays.append(relay)
        return child

    def watch_once(self) -> None:
        """Restart any child that died, with a growing pause when it keeps dying; give up (stop
        everything, `failed`) when one died `max_crashes` times in a row soon after starting."""
        for i, child in enumerate(self.children):
            code = child.process.poll()
            if code is None or self.stopping:
                continue
            healthy = time.monotonic() - child.started > HEALTHY_AFTER_S
            crashes = 0 if healthy else child.restarts + 1
            if crashes >= self.max_crashes:
                log.error(
                    "%s (pid %d) exited with %s, %d times in a row within %.0f s of starting; giving up",
                    child.slot.name,
                    child.process.pid,
                    code,
                    crashes,
                    HEALTHY_AFTER_S,
                )
                self.failed = self.stopping = True
                return
            pause = RESTART_BACKOFF_S[min(crashes, len(RESTART_BACKOFF_S) - 1)] if crashes else 0
            log.error("%s (pid %d) exited with %s; restarting in %ss", child.slot.name, child.process.pid, code, pause)
            time.sleep(pause)
            if self.stop_requested():  # a signal came during the pause
                return
            self.children[i] = self._spawn(child.slot, crashes)

    def stop_requested(self) -> bool:
        """Whether a signal asked to stop (the handler sets `stopping` at any moment)."""
        return self.stopping

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.start()
        while not self.stopping:
            self.watch_once()
            self.write_status()
            time.sleep(0.5)
        return self.shutdown()

    def write_status(self, force: bool = False) -> None:
        """Every STATUS_EVERY_S: this process and its children's pids, for `imagemill worker --check`."""
        now = time.time()
        if self.status_file is None or (not force and now - self._status_written < STATUS_EVERY_S):
            return
        status = {
            "supervisor": os.getpid(),
            "started": _start_time(os.getpid()),  # tells this supervisor from a later process given its pid
            "children": [c.process.pid for c in self.children],
            "at": now,
        }
        partial = self.status_file.with_name(self.status_file.name + ".tmp")
        try:
            partial.write_text(json.dumps(status), encoding="utf-8")
            partial.replace(self.status_file)
        except OSError as exc:  # a probe then fails: say why here
            log.warning("cannot write the worker status file %s: %s", self.status_file, exc)
        self._status_written = now

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info(
            "received %s: stopping workers (current chunks finish or go back to the queue)", signal.Signals(signum).name
        )
        self.stopping = True

    def shutdown(self) -> int:
        for child in self.children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        codes = [child.process.wait() for child in self.children]
        for child in self.children:  # the last lines of a child that exited are still on their way
            for relay in child.relays:
                relay.join(timeout=5)
        if self.status_file is not None:  # gone with its workers: `--check` finds none rather than a dead one
            self.status_file.unlink(missing_ok=True)
        if self.failed:
            return CRASHED
        return max((code for code in codes if code and code > 0), default=0)


def own_status_file(pid: int | None = None, host: str | None = None, directory: Path | None = None) -> Path:
    """The status file of the supervisor `pid` (this process) when IMAGEMILL_WORKER_STATUS_FILE is
    unset: its own, named by host and pid, so that workers sharing a host (and a /tmp) never share one."""
    folder = directory or Path(tempfile.gettempdir())
    return folder / f"{STATUS_PREFIX}{host or socket.gethostname()}-{pid or os.getpid()}.json"


def check_all_alive(host: str | None = None, directory: Path | None = None) -> str | None:
    """`imagemill worker --check` without IMAGEMILL_WORKER_STATUS_FILE: None when at least one
    supervisor runs on this host and every running one is healthy (`check_alive`); else what is
    wrong. Files whose supervisor is gone (a container restarted in the same pod, a SIGKILL) are
    left over, not running workers: they are passed over."""
    folder = directory or Path(tempfile.gettempdir())
    pattern = f"{STATUS_PREFIX}{host or socket.gethostname()}-*.json"
    running = [path for path in sorted(folder.glob(pattern)) if _writer_running(path)]
    if not running:
        return f"no imagemill worker runs on this host: no status file of a running supervisor in {folder}"
    return next((problem for path in running if (problem := check_alive(path)) is not None), None)


def _writer_running(path: Path) -> bool:
    """Whether the supervisor named in a status file's name still runs (the same process, not a
    later one given its pid)."""
    try:
        pid = int(path.stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return False
    if not _alive(pid):
        return False
    try:
        started = json.loads(path.read_text(encoding="utf-8")).get("started")
    except (OSError, ValueError, AttributeError):
        return True  # unreadable while its pid lives: check_alive says what is wrong with it
    return started is None or started == _start_time(pid)


def check_alive(status_file: Path, stale_after_s: float = STATUS_STALE_S) -> str | None:
    """None when the supervisor that writes `status_file` is watching live Celery workers; else
    what is wrong, in one line (the liveness probe of `imagemill worker --check`)."""
    try:
        status = json.loads(status_file.read_text(encoding="utf-8"))
        age = time.time() - float(status["at"])
        pids = [int(pid) for pid in [status["supervisor"], *status["children"]]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no worker status in {status_file}: {exc}"
    if age > stale_after_s:
        return f"the supervisor last wrote {status_file} {age:.0f} s ago"
    if len(pids) < 2:
        return "the supervisor runs no worker process"
    for pid in pids:
        if not _alive(pid):
            return f"process {pid} of the worker is gone"
    if status.get("started") not in (None, _start_time(pids[0])):
        return f"the supervisor {pids[0]} is gone (its pid now names another process)"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    stat = Path(f"/proc/{pid}/stat")
    # a zombie is dead but not yet reaped
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def _start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc, Linux); None elsewhere or when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[-1].split()[19])  # field 22, starttime; the fields after `)` start at 3
