# ConceptGuard server image. CPU by default; for NVIDIA GPUs pass a CUDA base image and let
# pip take the CUDA build of torch (docs/DEPLOY.md):
#
#   docker build -t conceptguard:cpu .
#   docker build -t conceptguard:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_SPEC=torch --build-arg TORCH_INDEX_URL= .
#
# The base image must provide python3 (3.10+) with venv and pip; the CUDA images above need
# `apt-get install python3-venv` first (done below when python3 -m venv is missing).

ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- build stage: a virtual environment with conceptguard and the embedded model ----------
FROM ${BASE_IMAGE} AS build
# CPU builds pin the CPU wheel of torch (PyPI's default Linux wheel bundles CUDA, 3 GB).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv --help >/dev/null 2>&1 || \
    (apt-get update && apt-get install -y --no-install-recommends python3-venv python3-pip \
     && rm -rf /var/lib/apt/lists/*)
RUN python3 -m venv /opt/conceptguard
ENV PATH=/opt/conceptguard/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY conceptguard ./conceptguard
COPY server ./server
COPY patches ./patches
COPY erasure ./erasure
COPY bench ./bench
# torch first (or in the same command), else peft/accelerate pull the CUDA build.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "$TORCH_SPEC"; \
    fi \
    && pip install .

# --- runtime stage: the venv, the model, a non-root user ---------------------------------
FROM ${BASE_IMAGE} AS runtime
# CUDA base images have no Python: the same interpreter the venv was built with.
RUN command -v python3 >/dev/null 2>&1 || \
    (apt-get update && apt-get install -y --no-install-recommends python3 \
     && rm -rf /var/lib/apt/lists/*)
COPY --from=build /opt/conceptguard /opt/conceptguard
# The embedded default model (the committed MiniCanvas pipeline, ~25 MB): a container
# serves it offline with no --model (server/default_model.py reads the variable below).
COPY models/minicanvas /opt/conceptguard-models/minicanvas
RUN useradd --system --uid 10001 --create-home --home-dir /home/conceptguard conceptguard \
    && mkdir -p /var/lib/conceptguard/registry /etc/conceptguard \
    && chown -R conceptguard:conceptguard /var/lib/conceptguard /etc/conceptguard

ENV PATH=/opt/conceptguard/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    CONCEPTGUARD_DEFAULT_MODEL=/opt/conceptguard-models/minicanvas \
    CONCEPTGUARD_REGISTRY=/var/lib/conceptguard/registry

USER 10001
WORKDIR /home/conceptguard
# The registry (shared by every replica) and the config file (tenants, key hashes, limits).
VOLUME ["/var/lib/conceptguard/registry", "/etc/conceptguard"]
EXPOSE 8000

# /health is 200 once every worker has loaded the model and built every tenant's stack.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

# Exec form: serve is PID 1 and gets SIGTERM itself (it stops its workers cleanly).
# Add --config /etc/conceptguard/config.yaml, --device cuda, --workers N as needed.
ENTRYPOINT ["conceptguard", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
