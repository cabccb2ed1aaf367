"""The producer's listing at scale, alone in a process: `python -m bench.scale.listing MANIFEST`.

Lists a manifest through `ManifestSource.refs()` and cuts it into chunk messages with
`imagemill.producer.chunking.chunks` exactly as `submit` does, without enqueueing anything, while a thread
samples this process's RSS. Prints one JSON object: start, peak and end RSS, the drift between
the first and last tenth of the run, and the listing rate.
"""

import argparse
import json
import os
import time
from pathlib import Path

from bench.memory import MIB, Sampler, curve, drift, peak_rss, rss
from imagemill.core.tasks import Task
from imagemill.pipeline.sources import ManifestSource
from imagemill.producer.chunking import chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args()

    listed = 0
    pid = os.getpid()
    tasks = (Task.CAPTION, Task.MODERATION, Task.TAGS)
    start = rss(pid)
    started = time.perf_counter()
    with Sampler(pid, args.interval, probe=lambda: {"listed": listed}) as sampler:
        for chunk in chunks("0123456789ab", tasks, ManifestSource(args.manifest.absolute()).refs(), args.chunk_size):
            listed += len(chunk.refs)
            chunk.model_dump(mode="json")  # what `submit` does to each chunk before sending it
    elapsed = time.perf_counter() - started
    values = [s.rss for s in sampler.samples]
    print(
        json.dumps(
            {
                "objects": listed,
                "seconds": elapsed,
                "objects_per_s": listed / elapsed,
                "start_mib": start / MIB,
                "peak_mib": max(peak_rss(pid) or 0, *values) / MIB,
                "end_mib": rss(pid) / MIB,
                "drift": drift(values),
                "growth": (max(values) - start) / start,
                "samples": len(values),
                "curve": curve(sampler.samples),
            }
        )
    )


if __name__ == "__main__":
    main()
