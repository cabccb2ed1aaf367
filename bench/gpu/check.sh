#!/usr/bin/env bash
# imagemill's GPU check in one device call (see bench/README.md, "GPU check"):
#   bash bench/gpu/prepare.sh        # here, once: the wheels the device lacks, into bench/gpu/wheels/
#   bash bench/gpu/check.sh          # on the device (carry bench/gpu/wheels): prints one table, < 8 min
#   bash bench/gpu/check.sh --cpu-smoke   # here or in CI: the same script on the CPU, tiny models, < 3 min
# The table also goes to $OUT/<stamp>-gpu.md (and .json) when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ] && [ "${1:-}" = "--cpu-smoke" ]; then python=.venv/bin/python
  elif command -v python3 >/dev/null 2>&1; then python=python3
  else python=python; fi
fi
site=""
if [ -d bench/gpu/wheels ] && ls bench/gpu/wheels/*.whl >/dev/null 2>&1 && [ "${1:-}" != "--cpu-smoke" ]; then
  site=$(mktemp -d /tmp/imagemill-gpu-site.XXXXXX)
  echo "installing $(ls bench/gpu/wheels/*.whl | wc -l) wheels into $site" >&2
  if "$python" -m pip --version >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --find-links bench/gpu/wheels --target "$site" bench/gpu/wheels/*.whl
  else  # no pip: a wheel is a zip laid out for site-packages
    "$python" - "$site" bench/gpu/wheels/*.whl <<'PY'
import sys, zipfile
for wheel in sys.argv[2:]:
    zipfile.ZipFile(wheel).extractall(sys.argv[1])
PY
  fi
fi
export PYTHONPATH="$repo${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m bench.gpu.check "$@"
