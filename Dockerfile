# syntax=docker/dockerfile:1
# One image for every Camelot process (shmbroker, agent + its stage replicas, scheduler, gateway,
# Locust) and for the MPS control daemon container: the daemon must run as the same UID as its
# clients, and the driver's MPS binaries are injected by the NVIDIA container toolkit at start.
#
#   docker build -t camelot:latest .
#   docker build --build-arg CUDA_TAG=13.0.0-runtime-ubuntu24.04 --build-arg CAMELOT_UID=1001 .
#
# Both stages start from the same CUDA runtime image so the venv's interpreter path
# (/usr/bin/python3.12) exists, byte for byte, in the final stage; only the builder gets a compiler.

ARG CUDA_TAG=13.0.0-runtime-ubuntu24.04

FROM nvidia/cuda:${CUDA_TAG} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first: this layer stays cached while only source changes.
COPY pyproject.toml README.md ./
COPY common/__init__.py common/__init__.py
RUN pip install --no-cache-dir "./[gpu]" \
    && pip uninstall -y camelot
COPY . .
# Generated gRPC code is built, never committed: generate it here (the Makefile's codegen without
# the mypy stubs, which only type checkers read).
RUN python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. protos/*.proto \
    && pip install --no-cache-dir --no-deps ./ \
    && python -c "from protos import broker_pb2_grpc, gateway_pb2_grpc, admin_pb2_grpc" \
    && rm -rf build ./*.egg-info

FROM nvidia/cuda:${CUDA_TAG}
ARG CAMELOT_UID=10001
ARG CAMELOT_GID=10001
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
# Interpreter only: no compilers, no headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
# The ubuntu image ships user "ubuntu" at 1000; Camelot's own user keeps a fixed, high UID that
# the compose file and the Kubernetes manifests repeat (MPS serves clients of one UID only).
# The directories shared through volumes are created here, owned by that user, so a fresh named
# volume copies this ownership on first mount.
RUN groupadd --system --gid "${CAMELOT_GID}" camelot \
    && useradd --system --uid "${CAMELOT_UID}" --gid camelot --home-dir /app \
        --shell /usr/sbin/nologin camelot \
    && mkdir -p /tmp/camelot /tmp/nvidia-mps /tmp/nvidia-log \
    && chown camelot:camelot /tmp/camelot /tmp/nvidia-mps /tmp/nvidia-log
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=root:root /src /app
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CUDA_DEVICE_ORDER=PCI_BUS_ID \
    CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps \
    CUDA_MPS_LOG_DIRECTORY=/tmp/nvidia-log
USER ${CAMELOT_UID}:${CAMELOT_GID}
# Each service overrides the command (see deploy/compose/docker-compose.yml).
CMD ["python", "-m", "services.gateway"]
