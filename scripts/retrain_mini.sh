#!/usr/bin/env bash
# Retrain the shipped `mini` preset (v3) in one command, on the CPU: training crops, then v3's four stages as they
# were run (A: 500 steps at 64 px; B: 90 at 128 px + 35 at 256 px; C: 300 at 64 px; D, with the gated skip: 400 at
# 64 px + 120 at 128 px + 30 at 256 px), warm-started from the v2 preset as committed in git (commit df2391b: its
# transformer body and clean branch; v3's output layer, gate and output convolution start at zero), then install
# into mdsd3_cli/model/presets/mini (fingerprints checked). About 60 minutes on one thread of a 2-core CPU shared
# with other jobs (docs/mini.md). docs/mini.md explains each step; v1 and v2 themselves
# came from the two stages it describes (v2 is not retrained here: its weights are in git).
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
v2_commit=df2391b
mkdir -p "$out/v2"
git archive "$v2_commit" mdsd3_cli/model/presets/mini | tar -x -C "$out/v2"
python scripts/train_mini.py data --out "$out/data"
OMP_NUM_THREADS=1 python scripts/train_mini.py train --cpu --threads 1 \
    --init "$out/v2/mdsd3_cli/model/presets/mini" --alpha 0.3 --beta 1.0 \
    --prediction residual_x0 --output-conv --couple-noise \
    --phase 64:16:500 --phase 128:8:220 --phase 256:4:60 --lr 2e-4 --warmup 50 --ema 0.99 --stop-at 500 \
    --log-every 10 --sanity-steps 4 --data "$out/data" --out "$out/v3a" "${quick[@]}"
common=(--cpu --threads 1 --alpha 0.3 --beta 1.0 --prediction residual_x0 --output-conv --couple-noise
        --data "$out/data" --sanity-steps 4 "${quick[@]}")
OMP_NUM_THREADS=1 python scripts/train_mini.py train "${common[@]}" --init "$out/v3a/preset" \
    --phase 128:8:90 --phase 256:4:35 --lr 1.5e-4 --warmup 10 --ema 0.98 --log-every 5 --out "$out/v3b"
OMP_NUM_THREADS=1 python scripts/train_mini.py train "${common[@]}" --init "$out/v3b/preset" \
    --phase 64:16:300 --phase 128:8:100 --phase 256:4:20 --lr 1e-4 --warmup 10 --ema 0.98 --stop-at 300 \
    --log-every 10 --out "$out/v3c"
OMP_NUM_THREADS=1 python scripts/train_mini.py train "${common[@]}" --init "$out/v3c/preset" --gated-skip \
    --phase 64:16:400 --phase 128:8:120 --phase 256:4:30 --lr 1e-4 --warmup 10 --ema 0.98 --log-every 10 \
    --out "$out/v3d"
if [ ${#quick[@]} -eq 0 ]; then
    python scripts/train_mini.py install --preset "$out/v3d/preset"
else
    echo "--quick: pipeline checked, nothing installed ($out/v3d/preset)"
fi
