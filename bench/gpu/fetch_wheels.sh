#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has Python 3.12, torch, transformers, numpy, safetensors,
# prometheus-client, accelerate; not diffusers, litserve, fastapi, uvicorn, pydantic, ...),
# downloaded here into .gpu-wheels/ (git-ignored, ~20 MB) for the device tool to carry.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu-wheels
python3 -m pip download --only-binary=:all: --no-deps --implementation cp --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 -d .gpu-wheels \
  diffusers==0.42.1 litserve==0.2.19 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 peft==0.21.2 python-multipart pyzmq \
  opentelemetry-api importlib-metadata lazy-importer zipp "typing-extensions>=4.16" \
  typing-inspection annotated-types pyyaml h11 click anyio sniffio idna requests urllib3 \
  charset-normalizer certifi pillow tqdm
du -sh .gpu-wheels
