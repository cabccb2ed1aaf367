"""`python -m bench`: the throughput harness (`bench/throughput/harness.py`), as `python -m bench.throughput`."""

import sys

from bench.throughput.harness import main

if __name__ == "__main__":
    sys.exit(main())
