"""The pipeline layer: sources, incremental skip, fetch ▸ decode ▸ batch ▸ models, the one run loop.

Local mode, the Celery chunk task, the Python API and the benchmark all run images through here.
"""

import os

# Before torch loads its OpenMP runtime: idle model threads sleep instead of spinning, so they do
# not fight the decode threads for the cores (measured on 2 cores, tiny models: spinning 14
# images/s beside a busy neighbour, passive 200; real-size models keep both cores for compute).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
