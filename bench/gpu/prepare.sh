#!/usr/bin/env bash
# Run here (with network), before the device call: downloads into bench/gpu/wheels/ (git-ignored,
# carried to the device with the tree) the Python 3.12 x86_64 wheels of imagemill's runtime
# dependencies (pyproject.toml's [project] dependencies, read here so that a new one comes along)
# that the device machine lacks. The device has torch, torchvision, transformers (and so
# huggingface_hub, safetensors, tokenizers), numpy, pillow, pyarrow, prometheus-client, rich and
# typer: those are never fetched, the device's own builds match its torch and CUDA.
set -euo pipefail
cd "$(dirname "$0")"
mapfile -t requirements < <(python3 -c '
import tomllib
for requirement in tomllib.load(open("../../pyproject.toml", "rb"))["project"]["dependencies"]:
    print(requirement)
')
rm -rf wheels && mkdir wheels
python3 -m pip download -q --dest wheels --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  "${requirements[@]}"
for present in numpy torch torchvision transformers huggingface_hub safetensors tokenizers pillow \
  pyarrow prometheus_client rich typer markdown_it_py mdurl pygments shellingham; do
  rm -f wheels/"${present}"-*.whl
done
ls wheels | sed 's/^/  /'
du -sh wheels

# a snapshot of the last commit with the wheels inside (bench/gpu/snapshot/, git-ignored): the device
# call carries it and runs `bash bench/gpu/snapshot/bench/gpu/check.sh`, so that uncommitted work in
# the working tree never travels into the measurement
rm -rf snapshot && mkdir snapshot
git -C ../.. archive HEAD | tar -x -C snapshot
cp -r wheels snapshot/bench/gpu/wheels
echo "snapshot of $(git -C ../.. rev-parse --short HEAD): bench/gpu/snapshot ($(du -sh snapshot | cut -f1))"
