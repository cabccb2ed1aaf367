"""Fault injection for the chaos tests (`IMAGEMILL_FAULTS`), off unless a test turns it on.

`crash_on_uri`: kill this process (as a segfaulting decoder would) on an image whose URI holds it.
`sleep_per_image_s`: slow every image down, to catch a worker mid-chunk.
"""

import os
import signal
import time

from imagemill.schemas import ImageRef


def before_image(faults: dict[str, str | float], ref: ImageRef) -> None:
    if not faults:
        return
    marker = faults.get("crash_on_uri")
    if isinstance(marker, str) and marker and marker in ref.uri:
        os.kill(os.getpid(), signal.SIGKILL)
    delay = float(faults.get("sleep_per_image_s", 0) or 0)
    if delay:
        time.sleep(delay)
