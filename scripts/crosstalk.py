#!/usr/bin/env python3
"""Cross-talk of `evaluate`'s class estimators: how far each estimator moves under every class's classical
degradation, printed as a Markdown table (the one in docs/evaluate.md) and, with --json, as JSON.

    python scripts/crosstalk.py                 # 6 photos at 256², ratios 0.5 and 1, 2 seeds (16 s of CPU time)
    python scripts/crosstalk.py --quick --json  # 3 photos at 128², ratio 1, 1 seed (the test's mode)

Rows are degradations: rain, haze, noise and low_light from `mdsd3_cli.model.presets.degradations` (the
training pairs' physics; haze with depth, Poisson-Gaussian noise, under-exposure with gamma and sensor noise),
blur (Gaussian, σ = 1.5·ratio px at 256², from `mdsd3_cli.evaluate.classical`, as the presets have none), and
low light as exposure alone (1.8·ratio stops, `classical.low_light`: the presets' low light also adds the dark
image's sensor noise, which the noise estimator rightly reads).
Columns are estimators. A cell is the mean normalised strength (strength / CLASS_SCALES) the estimator reads on
the degraded photo against its clean original, over photos, ratios and seeds; every estimator reads 0 on an
unchanged photo, so the cell is its mean move. `worst_off_diagonal` per row is the largest other estimator's
move divided by the row's own class's estimator's move: at most 0.2 means that degradation moves its own class at
least 5x more than any other. Deterministic: fixed seeds, CPU.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from skimage import data

from mdsd3_cli.evaluate import classical
from mdsd3_cli.evaluate.measures import CLASS_ESTIMATORS, CLASS_SCALES, measure_pair
from mdsd3_cli.model.presets import degradations

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera")
QUICK_PHOTOS = PHOTOS[:3]
BLUR_SIGMA_AT_256 = 1.5
"""Gaussian blur std in pixels at ratio 1 on a 256-pixel photo (scaled with the size, as the presets are)."""
EXPOSURE_STOPS = 1.8
"""Stops of the exposure-only row at ratio 1 (the presets' low light: 1.8 stops, then gamma and sensor noise)."""

Degrade = Callable[[np.ndarray, float, int], np.ndarray]


def square(name: str, size: int) -> np.ndarray:
    """A scikit-image photo, centre-cropped to a square and resized to `size`² (uint8 RGB)."""
    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side)))


def preset(name: str) -> Degrade:
    """The presets' classical degradation `name` on one uint8 photo at `ratio`, seeded."""

    def apply(pixels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
        return degradations.degrade_photo(pixels, name, ratio, torch.Generator().manual_seed(seed))

    return apply


def blur(pixels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    return classical.gaussian_blur(pixels, BLUR_SIGMA_AT_256 * ratio * pixels.shape[0] / 256)


def exposure(pixels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Under-exposure alone (no gamma, no sensor noise), as many stops as the presets' low light at `ratio`."""
    return classical.low_light(pixels, 2.0 ** (-EXPOSURE_STOPS * ratio))


def degradation_table() -> dict[str, tuple[str, Degrade]]:
    """Row label → (the class it degrades, its classical degradation): the presets' where they have one."""
    table = {name: (name, preset(name)) for name in degradations.DEGRADATIONS if name in CLASS_ESTIMATORS}
    table.setdefault("blur", ("blur", blur))
    table["low_light (exposure only)"] = ("low_light", exposure)
    return table


def crosstalk(photos: tuple[str, ...], size: int, ratios: tuple[float, ...], seeds: tuple[int, ...]) -> dict:
    """The matrix (degradation → estimator → mean normalised move) and each row's worst off-diagonal ratio."""
    cleans = [square(name, size) for name in photos]
    matrix: dict[str, dict[str, float]] = {}
    worst = {}
    for label, (own, degrade) in degradation_table().items():
        readings = [
            measure_pair(clean, degrade(clean, ratio, seed)) for clean in cleans for ratio in ratios for seed in seeds
        ]
        row = {
            estimator: float(np.mean([reading[estimator] for reading in readings])) / CLASS_SCALES[estimator]
            for estimator in CLASS_ESTIMATORS
        }
        other = max((estimator for estimator in row if estimator != own), key=lambda estimator: row[estimator])
        matrix[label] = row
        worst[label] = {"own": own, "estimator": other, "ratio": row[other] / row[own]}
    return {
        "photos": list(photos),
        "size": size,
        "ratios": list(ratios),
        "seeds": list(seeds),
        "matrix": matrix,
        "worst_off_diagonal": worst,
    }


def markdown(result: dict) -> str:
    estimators = list(CLASS_ESTIMATORS)
    lines = [
        "| degradation \\ estimator | " + " | ".join(estimators) + " | worst other / own |",
        "| --- " * (len(estimators) + 2) + "|",
    ]
    for label, row in result["matrix"].items():
        worst = result["worst_off_diagonal"][label]
        cells = [f"**{row[e]:.2f}**" if e == worst["own"] else f"{row[e]:.2f}" for e in estimators]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {worst['ratio']:.2f} ({worst['estimator']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 photos at 128², ratio 1, one seed")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the Markdown table")
    args = parser.parse_args(argv)
    if args.quick:
        result = crosstalk(QUICK_PHOTOS, 128, (1.0,), (0,))
    else:
        result = crosstalk(PHOTOS, 256, (0.5, 1.0), (0, 1))
    print(json.dumps(result, indent=2) if args.json else markdown(result))


if __name__ == "__main__":
    main()
