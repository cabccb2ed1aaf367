"""`python -m bench.throughput` (also `python -m bench`): the throughput harness of `harness.py`."""

import sys

from bench.throughput.harness import main

if __name__ == "__main__":
    sys.exit(main())
