"""The worker service: the annotation engine and, in distributed mode, the Celery app around it.

fetch ▸ decode ▸ batch ▸ models, written once; local mode calls the engine directly.
"""

import os

# Before torch loads its OpenMP runtime: idle model threads sleep instead of spinning, so they do
# not fight the decode threads for the cores (measured on 2 cores, tiny models: spinning 14
# images/s beside a busy neighbour, passive 200; real-size models keep both cores for compute).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
