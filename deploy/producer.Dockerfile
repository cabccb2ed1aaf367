# syntax=docker/dockerfile:1
# Producer / CLI image: `imagemill submit|status|jobs|cancel`. No torch, no transformers:
# the project is installed without the `worker` extra.
#
#   docker build -f deploy/producer.Dockerfile -t imagemill-producer .    (from the repo root)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md /src/
COPY imagemill /src/imagemill
COPY producer /src/producer
COPY worker /src/worker
RUN pip install /src \
 && python -c "import sys, imagemill.cli, imagemill.producer.submit; assert 'torch' not in sys.modules"

FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 imagemill \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/imagemill --shell /usr/sbin/nologin imagemill
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/imagemill
USER 10001:10001
# tini as PID 1: a SIGTERM (docker stop, a deleted Job) reaches `imagemill submit`
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["imagemill", "--help"]
