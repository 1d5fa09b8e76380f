#!/usr/bin/env bash
# Train the `mini` preset on one GPU (H100/H200) in one call: bash scripts/gpu_train_mini.sh [MINUTES [ARGS...]]
# (ARGS go to `train_mini.py train`, e.g. --batch 256; `bash scripts/gpu_train_mini.sh 1 --quick` checks it on a CPU).
# Needs the training data made here beforehand (python scripts/train_mini.py data -> out/mini_data/) and, on the
# lent device machine, the wheels in .whl/ (diffusers, pydantic, pydantic_core, annotated-types,
# typing-inspection); carry both. MINUTES (default 7) is the training loop's time; add about a minute for
# setup, saving and the sanity sheets. Everything lands in $OUT (or ./gpu_train_out): preset/ (base/ +
# adapter/ + fingerprints.json), log.jsonl (loss curve), summary.json (steps, steps/s, GPU, fingerprints,
# sizes, identity PSNR), sanity.png, sanity_ratios.png, train.txt (the full console output).
# Install the result here with: python scripts/train_mini.py install --preset <OUT>/preset
set -uo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-7}
shift $(( $# > 0 ? 1 : 0 ))
if [ -d .whl ] && ! python3 -c "import diffusers, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-gpu_train_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 scripts/train_mini.py train --data out/mini_data --out "$OUT" --minutes "$MINUTES" "$@" 2>&1 | tee "$OUT/train.txt"
status=${PIPESTATUS[0]}
rm -rf "$OUT/prompt_cache"
exit "$status"
