#!/usr/bin/env bash
# One short GPU check (H100/H200): CUDA tests, then the inference and training benchmarks at SD3-medium size
# with random weights. Figures are JSON lines on stdout; copies go to $OUT (or ./gpu_check_out).
# On the lent device machine diffusers/pydantic come as wheels in .whl/ (see the device README).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -30 | tee "$OUT/cuda_tests.txt"
python3 scripts/benchmark.py --preset sd3-medium --device cuda --size 1024 --batch 1,2 --iters 5 --warmup 2 \
  --skip-sampler 2>>"$OUT/benchmark.err" | tee "$OUT/benchmark.jsonl"
python3 scripts/train_benchmark.py --preset sd3-medium --device cuda --resolution 512 --batch 1 4 \
    --checkpointing both --steps 5 --warmup 2 \
    2>>"$OUT/train_benchmark.err" | tee "$OUT/train_benchmark.jsonl"
