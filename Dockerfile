# syntax=docker/dockerfile:1.7
#
# vidrank images. Two targets share one base and one wheel build:
#
#   docker build --target serve -t vidrank:serve .   # online ranker: onnxruntime, NO torch
#   docker build --target train -t vidrank:train .   # offline trainer: torch (CPU wheels)
#
# `serve` is the last stage, so a plain `docker build .` also yields the serving image.
# Both images run as uid/gid 10001 and use /registry as the model registry (a named volume in
# docker/compose.yaml, a ReadWriteMany PVC in docker/k8s/). BuildKit is required (RUN --mount);
# it is the default builder since Docker 23.

# ---------------------------------------------------------------------------------------------
# base: interpreter, an empty virtualenv and the runtime user, shared by every stage.
# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim AS base

# No .pyc files (the serving root filesystem is read-only in k8s anyway), unbuffered logs so that
# `docker logs` / kubectl see every line at once, no pip cache baked into layers.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The venv is owned by root: the runtime user can import from it but never modify it.
RUN python -m venv /opt/venv

# One fixed uid/gid (10001) for serve and train, so that files the trainer publishes into the
# shared registry volume are writable by the rankers (the admin API rewrites aliases.json).
# /registry is created here and owned by that user: Docker copies this ownership into an empty
# named volume the first time it is mounted, so the volume starts writable for uid 10001.
RUN groupadd --system --gid 10001 vidrank \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/vidrank \
        --shell /usr/sbin/nologin vidrank \
 && mkdir -p /registry \
 && chown 10001:10001 /registry

WORKDIR /app

# ---------------------------------------------------------------------------------------------
# build: the project wheel (pure Python). Only the files the wheel needs are copied, so edits to
# tests, docs or docker/ never invalidate this layer.
# ---------------------------------------------------------------------------------------------
FROM base AS build
COPY pyproject.toml README.md requirements.lock ./
COPY model/ model/
COPY service/ service/
# The lock travels with the wheel: serve and train install their extra with `-c` on it, so the
# images run exactly the versions CI tested (`make lock` refreshes it).
RUN pip wheel --no-deps --wheel-dir /dist . \
 && cp requirements.lock /dist/ \
 && ls -l /dist

# ---------------------------------------------------------------------------------------------
# train: offline trainer / simulator / registry CLI. Publishes bundles into /registry.
# ---------------------------------------------------------------------------------------------
FROM base AS train

# torch comes from the PyTorch CPU index: the default PyPI wheel for Linux pulls the CUDA runtime
# (several GB of nvidia-* wheels) that a CPU trainer never uses. --index-url is given to that one
# pip call only, and without dependencies, so every other package still resolves from PyPI alone
# at the lock's versions (an --extra-index-url would let pip pick the highest version of *any*
# package across both indexes). The second call finds torch==2.13.0+cpu, which the lock pins,
# already installed.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install --index-url https://download.pytorch.org/whl/cpu --no-deps "torch==2.13.0+cpu" \
 && pip install -c /dist/requirements.lock "$(ls /dist/vidrank-*.whl)[train]" \
 && python -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"

ENV HOME=/home/vidrank
USER 10001:10001
VOLUME /registry
ENTRYPOINT ["vidrank"]
# Default: simulate 200k impressions, train, publish, activate if the registry has no production.
CMD ["train", "--registry", "/registry", "--simulate", "200000"]

# ---------------------------------------------------------------------------------------------
# serve: the online ranker. Only the `serve` extra (at the lock's versions): fastapi, uvicorn,
# onnxruntime, numpy ...
# NO torch: the service imports only the torch-free part of model/ (features, bundle, registry).
# The two checks below make that verifiable at build time: the build fails if torch got in
# (e.g. through a new dependency) or if the serving code path started importing it.
# ---------------------------------------------------------------------------------------------
FROM base AS serve

RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install -c /dist/requirements.lock "$(ls /dist/vidrank-*.whl)[serve]"

# torch must not be installed (exit status 1 if it is) ...
RUN python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torch') is not None)"
# ... and the service + CLI must import without it.
RUN python -c "import model.cli, service.http.app" \
 && vidrank serve --help > /dev/null

# Settings come from the environment (see docs/internals.md). Bind all interfaces inside the
# container; the registry is the mounted volume. WORKERS=2 uvicorn processes per container; in
# k8s the Deployment sets 1 and scales by pods instead.
# MALLOC_ARENA_MAX=2: fewer glibc malloc arenas (one per thread that allocates, by default).
# It no longer matters to a model swap: with the heap thresholds each worker pins
# (service/scoring/heap.py) the swap peak measured 1.05x of a model's footprint with 2 arenas and
# with 8 alike.
ENV VIDRANK_REGISTRY=/registry \
    VIDRANK_HOST=0.0.0.0 \
    VIDRANK_PORT=8000 \
    VIDRANK_WORKERS=2 \
    MALLOC_ARENA_MAX=2

USER 10001:10001
VOLUME /registry
EXPOSE 8000

# Liveness only (/healthz): a container whose registry is still empty is alive but not ready;
# readiness (/readyz) is what load balancers gate on (compose healthcheck, k8s readinessProbe).
# python's urllib, because slim images have no curl; urlopen raises (exit 1) on non-2xx.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('VIDRANK_HEALTH_PORT') or os.environ.get('VIDRANK_PORT', '8000')), timeout=2)"]

# Exec form: `vidrank` is PID 1 and receives SIGTERM directly, so uvicorn drains in-flight
# requests on `docker stop` / pod termination. Host, port, workers and registry come from env.
ENTRYPOINT ["vidrank", "serve"]
