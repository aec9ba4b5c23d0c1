#!/usr/bin/env bash
# The GPU benchmarks, as one command for the device tool's `run` (carry: .gpu-wheels):
#   bash bench/gpu/device_bench.sh            results under $OUT (JSON + logs)
#   CG_SMOKE=1 bash bench/gpu/device_bench.sh the same commands, tiny, on this CPU
# Installs the carried wheels into a scratch folder (no project install: the repo root goes
# on PYTHONPATH), then runs `bench gpu-suite` (bench/gpu_suite.py): the SD-1.5-shaped
# pipeline, mixed-stacks, serve-throughput --plain and hirm-cost, checked against the goals.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/cg-gpu-out}
mkdir -p "$OUT"
if [ -z "${CG_SMOKE:-}" ]; then
  deps=/tmp/cg-deps
  python3 -m pip install -q --no-index --no-deps --target "$deps" .gpu-wheels/*.whl
  export PYTHONPATH="$deps:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  python=python3
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv"
else
  python=${PYTHON:-.venv/bin/python}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
$python -c "import torch, diffusers, litserve; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__, 'litserve', litserve.__version__)" | tee "$OUT/versions.txt"
run() {  # name, then the conceptguard arguments
  local name=$1; shift
  echo "== $name"
  $python -m conceptguard.cli "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -e "it/s]" -e "Warning" | tail -20
}
if [ -z "${CG_SMOKE:-}" ]; then
  run gpu_suite bench gpu-suite --out "$OUT" --device cuda --dtype float16 --steps 25 --batch 8
else
  run gpu_suite bench gpu-suite --out "$OUT" --tiny
fi
echo "results in $OUT"
