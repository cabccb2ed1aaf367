"""`python -m bench.scale.peak FILE MODULE ARGS…`: run MODULE as `python -m` would, then write this process's
peak resident memory (VmHWM, bytes) to FILE when it exits, however it exits.

A child's `ru_maxrss` (wait4, getrusage) keeps the high-water mark of the process it was forked
from, so a child of a large benchmark process reports at least the parent's size; VmHWM belongs to
the address space `exec` made, so it is the child's own. Imports nothing heavy: the figure is the module's.
"""

import atexit
import runpy
import sys
from pathlib import Path


def vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    out, module, *args = sys.argv[1:]
    atexit.register(lambda: Path(out).write_text(str(vmhwm())))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
