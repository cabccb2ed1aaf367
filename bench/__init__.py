"""imagemill's throughput benchmarks: `python -m bench --help`.

Generates photo-like JPEGs, builds model sets (tiny checkpoints, or the real architectures' sizes
with random weights), runs each scenario in this process or in child processes it owns, and writes
a report (Rich table, JSON and Markdown) under `bench/results/`. See `bench/README.md`.
"""

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_CACHE = BENCH_DIR / ".cache"
DEFAULT_RESULTS = BENCH_DIR / "results"
