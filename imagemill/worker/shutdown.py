"""How a worker stops on SIGTERM: warm at once (no new chunk; the running one finishes, is written
and acknowledged), bounded by IMAGEMILL_SOFT_SHUTDOWN_TIMEOUT, after which it goes cold.

Celery's own bounded stop (`REMAP_SIGTERM=SIGQUIT` and `worker_soft_shutdown_timeout`) sleeps the
whole timeout whenever a task was running when the signal came, even one that ends a second later.
A warm shutdown instead exits as soon as nothing runs; this module adds the bound: when the timeout
passes with the worker still up, it sends itself SIGQUIT, Celery's cold shutdown, which hands the
unfinished chunk back to the queue (unacknowledged, `task_reject_on_worker_lost`). Once stopped, the
process exits at once: Python's own finalization would garbage-collect everything torch and
transformers built, seconds of CPU on the way out of an idle worker. Connected by importing it in
`worker/celery.py`.
"""

import logging
import os
import signal
import sys
import threading
from typing import Any

from celery import current_app
from celery.signals import worker_shutdown, worker_shutting_down

log = logging.getLogger(__name__)

_bound: threading.Timer | None = None


@worker_shutting_down.connect
def _bound_warm_shutdown(how: str = "", **_: Any) -> None:
    """On a warm shutdown (SIGTERM), arm the soft-shutdown timeout once; runs in the signal handler."""
    global _bound
    if how != "Warm" or _bound is not None:
        return
    timeout = float(current_app.conf.worker_soft_shutdown_timeout or 0)
    _bound = threading.Timer(timeout, _go_cold, args=(timeout,))
    _bound.daemon = True  # a worker that finished its chunk exits without waiting for it
    _bound.start()


def _go_cold(timeout: float) -> None:
    # the timeout has been waited here already: the cold shutdown must not wait it a second time
    current_app.conf.worker_soft_shutdown_timeout = 0
    log.warning("the running chunk did not finish within %g s of SIGTERM; handing it back to the queue", timeout)
    os.kill(os.getpid(), signal.SIGQUIT)


@worker_shutdown.connect
def _exit_now(sender: Any = None, **_: Any) -> None:
    """The worker has stopped: its chunk written and acknowledged (or handed back), its pool joined."""
    code = getattr(sender, "exitcode", 0)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0)
