"""imagemill's benchmarks, by purpose: `throughput/` (`python -m bench`: the scenarios and the
captioners), `scale/` (one probe per large job: `python -m bench.scale.<probe>`) and `gpu/` (the check
for a lent device). Shared here: images and model sets, /proc memory and the machine's load, and
`report.save_results`, which writes every report under `bench/results/`. See `bench/README.md`.
"""

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_CACHE = BENCH_DIR / ".cache"
DEFAULT_RESULTS = BENCH_DIR / "results"
