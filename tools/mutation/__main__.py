"""`python -m tools.mutation`: see `run.py`."""

import sys

from tools.mutation.run import main

if __name__ == "__main__":
    sys.exit(main())
