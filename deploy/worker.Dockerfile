# syntax=docker/dockerfile:1
# GPU worker: `imagemill worker --gpus all` runs one Celery worker process per visible GPU,
# each started with CUDA_VISIBLE_DEVICES set (worker/supervisor.py).
#
#   docker build -f deploy/worker.Dockerfile -t imagemill-worker .      (from the repo root)
#
# torch wheels bundle their own CUDA libraries; the host needs only the NVIDIA driver and
# the NVIDIA Container Toolkit. TORCH_VERSION matches the CPU build CI tests (.ci/run);
# TORCH_INDEX_URL picks the CUDA build and must offer that version.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CUDA index: the project's unpinned `torch>=2.2` is then satisfied
# and pip does not fetch another build
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY imagemill /src/imagemill
COPY producer /src/producer
COPY worker /src/worker
RUN pip install "/src[worker]" \
 && python -c "import torch, transformers, imagemill.cli, imagemill.worker.celery"

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 imagemill \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/imagemill --shell /usr/sbin/nologin imagemill \
 && mkdir -p /models \
 && chown 10001:10001 /models
COPY --from=build /opt/venv /opt/venv
# HF_HOME: the model cache, a volume (compose `models`, a PVC in Kubernetes).
# XDG_CACHE_HOME: torch/triton caches go to /tmp, writable with a read-only root filesystem.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/models \
    XDG_CACHE_HOME=/tmp/.cache \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/imagemill
USER 10001:10001
# tini as PID 1 forwards SIGTERM to the supervisor (which forwards it to each Celery worker)
# and reaps orphans
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["imagemill", "worker", "--gpus", "all"]
