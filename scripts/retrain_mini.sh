#!/usr/bin/env bash
# Retrain the shipped `mini` preset (v4) in one command, on the CPU: training crops, then v4's fine-tuning from the
# v3 preset as committed in git (commit d379e12), with the rain falling straight down (its direction is no longer a
# per-image draw) and rain drawn in half the samples (--class-weight rain=3): 1100 steps at 64 px (batch 16),
# 220 at 128 px (batch 8), 36 at 256 px (batch 4), lr 1e-4; then install into mdsd3_cli/model/presets/mini
# (fingerprints checked). 62 minutes of training on one thread of a 2-core CPU shared with other jobs
# (docs/mini.md). v3's own stages (A-D, from v2) are in git: `git show d379e12:scripts/retrain_mini.sh`.
#
#   bash scripts/retrain_mini.sh [OUT] [--quick]    # OUT: work folder (default out/mini_retrain)
#
# --quick checks the whole pipeline in a few minutes (a few steps, weights meaningless) and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
out=out/mini_retrain
quick=()
for arg in "$@"; do
    case "$arg" in
        --quick) quick=(--quick) ;;
        -*) echo "unknown option: $arg (only --quick)" >&2; exit 2 ;;
        *) out=$arg ;;
    esac
done
if [ -e "$out" ]; then
    echo "$out exists: choose a new work folder (nothing is overwritten)" >&2
    exit 2
fi
v3_commit=d379e12
mkdir -p "$out/v3"
git archive "$v3_commit" mdsd3_cli/model/presets/mini | tar -x -C "$out/v3"
python scripts/train_mini.py data --out "$out/data"
OMP_NUM_THREADS=1 python scripts/train_mini.py train --cpu --threads 1 --alpha 0.3 --beta 1.0 \
    --prediction residual_x0 --output-conv --couple-noise --gated-skip --class-weight rain=3 \
    --init "$out/v3/mdsd3_cli/model/presets/mini" --phase 64:16:1100 --phase 128:8:220 --phase 256:4:36 \
    --lr 1e-4 --warmup 20 --ema 0.98 --log-every 20 --sanity-steps 4 --data "$out/data" --out "$out/v4" "${quick[@]}"
if [ ${#quick[@]} -eq 0 ]; then
    python scripts/train_mini.py install --preset "$out/v4/preset"
else
    echo "--quick: pipeline checked, nothing installed ($out/v4/preset)"
fi
