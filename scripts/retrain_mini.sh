#!/usr/bin/env bash
# Retrain the shipped `mini` preset (v2) from scratch in one command, on the CPU: training crops, stage 1 (v1: flow
# from pure noise, ~64 min on 2 cores), stage 2 (v2: flow from 0.3·noise + 1.0·photo, ~24 min), then install into
# mdsd3_cli/model/presets/mini (fingerprints checked). docs/mini.md explains each stage.
#
#   bash scripts/retrain_mini.sh [OUT] [--quick]    # OUT: work folder (default out/mini_retrain)
#
# --quick checks the whole pipeline in a few minutes (30 steps per stage, weights meaningless) and installs nothing.
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
python scripts/train_mini.py data --out "$out/data"
python scripts/train_mini.py train --cpu --steps 4800 --final-steps 500 --batch 16 --crop 64 --final-crop 128 \
    --data "$out/data" --out "$out/stage1" "${quick[@]}"
python scripts/train_mini.py train --cpu --init "$out/stage1/preset" --alpha 0.3 --beta 1.0 --steps 2000 \
    --final-steps 200 --batch 16 --crop 64 --final-crop 128 --lr 3e-4 --warmup 100 --sanity-steps 4 \
    --data "$out/data" --out "$out/stage2" "${quick[@]}"
if [ ${#quick[@]} -eq 0 ]; then
    python scripts/train_mini.py install --preset "$out/stage2/preset"
else
    echo "--quick: pipeline checked, nothing installed ($out/stage2/preset)"
fi
