"""The numbers of a calibration, no model and no files: the strength(ratio) curve with its spread, where it is not
monotone, its inversion by quantile mapping, and the 1-Wasserstein distance between strength distributions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUANTILE_COUNT = 11
"""Values of a calibrated `{quantiles: [...]}` ratio: probabilities 0, 0.1, ..., 1."""
RATIO_DIGITS = 4
"""Decimals a calibrated ratio is written with."""
MIN_RISE = 0.1
"""Smallest rise of the median curve from ratio 0 to ratio 1, in units of the class's reference scale
(evaluate's CLASS_SCALES), for the estimator to separate the class's strengths."""


@dataclass(frozen=True)
class Curve:
    """Measured strength against ratio: `strengths[i, g]` of probe image i at `ratios[g]` (increasing)."""

    ratios: np.ndarray
    strengths: np.ndarray

    @property
    def median(self) -> np.ndarray:
        return np.median(self.strengths, axis=0)

    @property
    def low(self) -> np.ndarray:
        """25th percentile across probe images at each ratio."""
        return np.quantile(self.strengths, 0.25, axis=0)

    @property
    def high(self) -> np.ndarray:
        """75th percentile across probe images at each ratio."""
        return np.quantile(self.strengths, 0.75, axis=0)

    @property
    def monotone(self) -> np.ndarray:
        """The median curve made non-decreasing (least-squares isotonic fit), the curve the inversion uses."""
        return isotonic(self.median)

    def decreasing_intervals(self) -> list[tuple[float, float]]:
        """Ratio intervals [r_g, r_g+1] over which the median strength falls."""
        median = self.median
        return [
            (float(self.ratios[g]), float(self.ratios[g + 1]))
            for g in range(len(median) - 1)
            if median[g + 1] < median[g]
        ]

    def rise(self) -> float:
        """How far the monotone curve climbs from its lowest to its highest ratio."""
        monotone = self.monotone
        return float(monotone[-1] - monotone[0])

    def spread(self) -> float:
        """Typical spread between probe images: the median over ratios of the interquartile range."""
        return float(np.median(self.high - self.low))


def isotonic(values: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to `values` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in np.asarray(values, dtype=np.float64):
        blocks.append([float(value), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, count = blocks.pop()
            blocks[-1] = [
                (blocks[-1][0] * blocks[-1][1] + mean * count) / (blocks[-1][1] + count),
                blocks[-1][1] + count,
            ]
    return np.concatenate([np.full(int(count), mean) for mean, count in blocks])


def invert(strengths: np.ndarray, ratios: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """The smallest ratio at which the non-decreasing piecewise-linear `curve` (strength at each of `ratios`)
    reaches each strength; strengths outside the curve's range give its first or last ratio."""
    strengths = np.atleast_1d(np.asarray(strengths, dtype=np.float64))
    result = np.empty_like(strengths)
    for index, strength in enumerate(strengths):
        if strength <= curve[0]:
            result[index] = ratios[0]
        elif strength >= curve[-1]:
            result[index] = ratios[np.flatnonzero(curve >= curve[-1])[0]]  # the first ratio reaching the top
        else:
            g = int(np.searchsorted(curve, strength, side="left")) - 1  # curve[g] < strength <= curve[g + 1]
            fraction = (strength - curve[g]) / (curve[g + 1] - curve[g])
            result[index] = ratios[g] + fraction * (ratios[g + 1] - ratios[g])
    return result


@dataclass(frozen=True)
class RatioMapping:
    """A class's calibrated ratio distribution and how much of the reference the model could not reach."""

    quantiles: list[float]
    """Ratio at probabilities 0, 1/K, ..., 1: the recipe's `{quantiles: [...]}`."""
    below_range: float
    """Fraction of the reference weaker than the model at the lowest ratio (mapped to it)."""
    above_range: float
    """Fraction of the reference stronger than the model at the highest ratio (mapped to it)."""


def quantile_mapping(reference: np.ndarray, curve: Curve, count: int = QUANTILE_COUNT) -> RatioMapping:
    """Quantile mapping: the reference strength at probabilities 0, 1/(count − 1), ..., 1, each taken through the
    inverse of the monotone median curve. A ratio drawn from these quantiles then gives strengths whose
    quantiles follow the reference's, up to the spread between images."""
    reference = np.asarray(reference, dtype=np.float64)
    levels = np.linspace(0.0, 1.0, count)
    monotone = curve.monotone
    ratios = invert(np.quantile(reference, levels), curve.ratios, monotone)
    quantiles = [round(float(value), RATIO_DIGITS) for value in np.maximum.accumulate(np.clip(ratios, 0.0, 1.0))]
    return RatioMapping(quantiles, float(np.mean(reference < monotone[0])), float(np.mean(reference > monotone[-1])))


def wasserstein(first: np.ndarray, second: np.ndarray) -> float:
    """1-Wasserstein distance between two samples' distributions (in their units)."""
    from scipy import stats  # as evaluate does: scipy.stats takes a second to import

    return float(stats.wasserstein_distance(np.asarray(first, np.float64), np.asarray(second, np.float64)))
