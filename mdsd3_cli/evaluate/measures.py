"""What `evaluate` measures on one (clean, degraded) pair, and each class's normalised strength."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import estimators

Estimator = Callable[[estimators.Pair], float]

GENERIC_MEASURES: dict[str, Estimator] = {"psnr": estimators.psnr, "ssim": estimators.ssim}
"""Full-reference measures every pair gets, whatever its classes."""

CLASS_ESTIMATORS: dict[str, Estimator] = {
    "noise": estimators.noise_sigma,
    "haze": estimators.haze_veil,
    "rain": estimators.rain_streaks,
    "low_light": estimators.low_light_stops,
    "blur": estimators.blur_loss,
}
"""The degradation classes with a strength estimator; other classes get the generic measures only."""

CLASS_UNITS: dict[str, str] = {
    "noise": "8-bit levels (std)",
    "haze": "veil, fraction of full scale",
    "rain": "8-bit levels per pixel (oriented gradient)",
    "low_light": "stops (EV) darker",
    "blur": "fraction of finest detail lost",
}
SEAM = "seam"
"""The seam measure's name (`estimators.seam_ratio` on a configurable grid): not a class, a generic measure."""

CLASS_SCALES: dict[str, float] = {"noise": 25.0, "haze": 0.5, "rain": 8.0, "low_light": 2.0, "blur": 0.5}
"""Reference strength of each class: normalised strength = strength / scale, so 1.0 means a clearly visible
degradation of that class (noise sigma 25 levels, a veil of half the full scale, moderate rain, two stops
under-exposed, half the finest detail gone) and classes compare on one scale."""

MEASURE_NAMES: tuple[str, ...] = (*GENERIC_MEASURES, SEAM, *CLASS_ESTIMATORS)


def measure_pair(
    clean: np.ndarray | estimators.Reference, degraded: np.ndarray, seam_grid: int = estimators.DEFAULT_SEAM_GRID
) -> dict[str, float]:
    """Every measure of one pair: PSNR (dB), SSIM, the seam ratio on a `seam_grid`-pixel grid (1.0: no seams)
    and each class's strength in its own units (CLASS_UNITS).

    `clean` and `degraded` are RGB arrays [H, W, 3] of the same shape, uint8 or float in 0-255; pass the clean
    image as an `estimators.Reference` to reuse its planes across several degraded versions.
    """
    pair = estimators.Pair(clean, degraded)
    measures = {name: measure(pair) for name, measure in GENERIC_MEASURES.items()}
    measures[SEAM] = estimators.seam_ratio(pair, seam_grid)
    return {**measures, **{name: measure(pair) for name, measure in CLASS_ESTIMATORS.items()}}


def normalised_strengths(measures: dict[str, float]) -> dict[str, float]:
    """Each class's strength divided by its reference scale (CLASS_SCALES)."""
    return {name: measures[name] / scale for name, scale in CLASS_SCALES.items() if name in measures}
