# SIMS stage image: CUDA PyTorch, the sims_platform package, a non-root user, `sims` as the entrypoint.
#   docker build -t ghcr.io/sims-platform/sims:0.1.0-cuda12.8 .
#   docker build --build-arg BASE=python:3.11-slim -t sims:dev .      # CPU-only image for kind/minikube
ARG BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/sims \
    HF_HOME=/home/sims/.cache/huggingface

# The non-root user every pod runs as (the chart sets runAsUser/runAsGroup/fsGroup 1000).
RUN groupadd --gid 1000 sims && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/sims sims

WORKDIR /opt/sims
# Dependencies first (cached while only the code changes). The base image's torch satisfies the pin, so pip
# keeps the CUDA build instead of pulling a CPU wheel.
COPY pyproject.toml README.md ./
COPY sims_platform/__init__.py sims_platform/__init__.py
RUN pip install --upgrade pip && pip install . && pip uninstall -y sims-platform
COPY sims_platform sims_platform
COPY pipelines pipelines
RUN pip install --no-deps . && sims --help >/dev/null

USER 1000:1000
WORKDIR /home/sims
ENTRYPOINT ["sims"]
CMD ["--help"]
