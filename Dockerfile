# SIMS stage image: CUDA PyTorch, the sims_platform package, a non-root user, `sims` as the entrypoint.
#   docker build -t ghcr.io/sims-platform/sims:0.1.0-cuda12.8 .
#   docker build --build-arg BASE=python:3.11-slim --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu \
#     -t sims:dev .                                                    # CPU-only image for kind (k8s/README.md)
ARG BASE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE}
# Where torch comes from: empty = the base image's (the CUDA build); an index URL = that index's wheel.
ARG TORCH_INDEX=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/sims \
    HF_HOME=/home/sims/.cache/huggingface

# The non-root user every pod runs as (the chart sets runAsUser/runAsGroup/fsGroup 1000).
RUN groupadd --gid 1000 sims && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/sims sims

WORKDIR /opt/sims
# Dependencies first (cached while only the code changes), at the versions the tests ran with: constraints-dev.txt,
# less its torch pin. That pin is the CPU wheel (torch==X+cpu, from PyTorch's CPU index) the dev venv uses; it
# must not replace the base image's CUDA torch, which satisfies pyproject.toml's range. With TORCH_INDEX (the CPU
# dev image) torch comes from that index first, at the pinned version.
COPY pyproject.toml README.md constraints-dev.txt ./
COPY sims_platform/__init__.py sims_platform/__init__.py
RUN grep -v '^torch==' constraints-dev.txt > /tmp/constraints-image.txt \
 && pip install --upgrade pip \
 && if [ -n "$TORCH_INDEX" ]; then pip install --index-url "$TORCH_INDEX" "$(grep '^torch==' constraints-dev.txt)"; fi \
 && pip install -c /tmp/constraints-image.txt . && pip uninstall -y sims-platform
COPY sims_platform sims_platform
COPY pipelines pipelines
RUN pip install --no-deps . && sims --help >/dev/null

USER 1000:1000
WORKDIR /home/sims
ENTRYPOINT ["sims"]
CMD ["--help"]
