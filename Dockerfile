# focalserve container images: one Dockerfile, two targets (BuildKit required: `RUN --mount`).
#
#   docker build --target cpu -t focalserve:cpu .      # the CPU backend (also the default target)
#   docker build --target gpu -t focalserve:gpu .      # CuPy on an NVIDIA GPU (run with --gpus all)
#
# Base images are build arguments. The CPU image needs only a base with `python3` and its venv module: the
# official python:3.12-slim, or a Debian bookworm root file system (scripts/docker-smoke.sh builds one offline).
# Nothing assumes a Python version: everything runs from the virtual environment /opt/venv.
#
# pip behind a TLS-intercepting proxy: give it the CA bundle as an (optional) BuildKit secret,
#   docker build --secret id=pipcert,src=/etc/ssl/certs/ca-certificates.crt ...
# and it becomes PIP_CERT inside the RUN steps that install packages; without the secret pip uses its own CAs.

ARG BASE_IMAGE=python:3.12-slim
ARG GPU_BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------
# wheels: the two distributions (the client with its committed gRPC stubs), built once for both targets:
# the client is pure Python, the server carries its compiled CPU kernel (g++, server/setup.py), so its wheel
# is for this base's Python; the GPU base's python3 must be the same version (3.12 for the defaults).
# setuptools and the compiler live only here.
FROM ${BASE_IMAGE} AS wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# The base's own compiler; its version follows the base image's security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.lock requirements-runtime.lock ./
RUN --mount=type=secret,id=pipcert,required=false \
    if [ -s /run/secrets/pipcert ]; then export PIP_CERT=/run/secrets/pipcert; fi \
 && grep -E '^setuptools==' requirements.lock > requirements-build.lock \
 && python3 -m venv /opt/build \
 && /opt/build/bin/pip install -r requirements-runtime.lock -r requirements-build.lock
COPY proto ./proto
COPY client ./client
COPY server ./server
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels ./client ./server

# ---------------------------------------------------------------------------------------------------------
# GPU: the CUDA runtime image (NVRTC, cuBLAS, ...) plus the distribution's python3; CuPy from its wheel.
FROM ${GPU_BASE_IMAGE} AS gpu-base
# The CUDA images' Ubuntu moves its python3 packages with security updates: pinning them would break builds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements-runtime.lock /tmp/
RUN --mount=type=secret,id=pipcert,required=false \
    --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    if [ -s /run/secrets/pipcert ]; then export PIP_CERT=/run/secrets/pipcert; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -r /tmp/requirements-runtime.lock cupy-cuda12x==14.2.0 cuda-pathfinder==1.9.0 \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl \
 && /opt/venv/bin/pip check

FROM gpu-base AS gpu
RUN groupadd --system --gid 10001 focalserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin focalserve
COPY --from=gpu-builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_ARENA_MAX=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    CUPY_CACHE_DIR=/tmp/cupy-kernel-cache \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 50051 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "-m", "focalserve.healthcheck"]
ENTRYPOINT ["/opt/venv/bin/python", "-m", "focalserve"]

# ---------------------------------------------------------------------------------------------------------
# CPU (last, so a plain `docker build .` gives this one).
FROM ${BASE_IMAGE} AS cpu-builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements-runtime.lock /tmp/
RUN --mount=type=secret,id=pipcert,required=false \
    --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    if [ -s /run/secrets/pipcert ]; then export PIP_CERT=/run/secrets/pipcert; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install -r /tmp/requirements-runtime.lock \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl \
 && /opt/venv/bin/pip check

FROM ${BASE_IMAGE} AS cpu
RUN groupadd --system --gid 10001 focalserve \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin focalserve
COPY --from=cpu-builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_ARENA_MAX=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 50051 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/venv/bin/python", "-m", "focalserve.healthcheck"]
ENTRYPOINT ["/opt/venv/bin/python", "-m", "focalserve"]
