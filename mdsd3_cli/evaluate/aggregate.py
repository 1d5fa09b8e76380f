"""From per-sample numbers to the report's statistics: quantiles per variant, monotonicity (Spearman of the
requested ratio against the measured strength), selectivity, repeat diversity and distances between sets."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .measures import CLASS_ESTIMATORS, CLASS_SCALES, CLASS_UNITS, MEASURE_NAMES
from .runner import GroupResult

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
SELECTIVITY_FLOOR = 0.01
"""Smallest normalised rise a selectivity ratio divides by (no other class rose at all)."""


@dataclass
class SampleTable:
    """Per-sample numbers of one set, in columns (8 bytes a number): who, requested ratios, measures."""

    classes: list[str]
    keys: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)
    repeats: array = field(default_factory=lambda: array("i"))
    ratios: dict[str, array] = field(default_factory=dict)
    measures: dict[str, array] = field(default_factory=dict)
    diversity: dict[str, array] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ratios = {name: array("d") for name in self.classes}
        self.measures = {name: array("d") for name in MEASURE_NAMES}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, result: GroupResult) -> None:
        for measured in result.measured:
            sample = measured.sample
            self.keys.append(result.group.key)
            self.variants.append(sample.variant)
            self.folders.append(sample.folder)
            self.repeats.append(sample.repeat)
            for name in self.classes:
                self.ratios[name].append(sample.ratios.get(name, 0.0))
            for name in MEASURE_NAMES:
                self.measures[name].append(measured.measures[name])
        for variant, diversity in result.diversity.items():
            self.diversity.setdefault(variant, array("d")).append(diversity)

    def column(self, name: str) -> np.ndarray:
        """A measure (or, with a `ratio:` prefix, a requested ratio) as a float array."""
        if name.startswith("ratio:"):
            return np.frombuffer(self.ratios[name.removeprefix("ratio:")], dtype=np.float64)
        return np.frombuffer(self.measures[name], dtype=np.float64)

    def normalised(self, name: str) -> np.ndarray:
        return self.column(name) / CLASS_SCALES[name]

    def variant_mask(self, variant: str) -> np.ndarray:
        return np.array([value == variant for value in self.variants], dtype=bool)

    def row(self, index: int) -> dict[str, Any]:
        """One sample as a flat mapping (the per-sample CSV's columns)."""
        row: dict[str, Any] = {
            "key": self.keys[index],
            "variant": self.variants[index],
            "folder": self.folders[index],
            "repeat": self.repeats[index],
        }
        row.update({f"ratio:{name}": self.ratios[name][index] for name in self.classes})
        row.update({name: self.measures[name][index] for name in MEASURE_NAMES})
        row.update({f"{name}_norm": self.measures[name][index] / CLASS_SCALES[name] for name in CLASS_ESTIMATORS})
        return row


def _finite(value: float) -> float | None:
    """JSON-safe number: None for nan and ±inf."""
    return float(value) if np.isfinite(value) else None


def describe(values: np.ndarray) -> dict[str, float | None]:
    """Count, mean and quantiles of the finite values."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"count": 0}
    summary: dict[str, float | None] = {"count": int(finite.size), "mean": _finite(float(finite.mean()))}
    for quantile, value in zip(QUANTILES, np.quantile(finite, QUANTILES)):
        summary[f"q{round(quantile * 100):02d}"] = _finite(float(value))
    summary["median"] = summary["q50"]
    return summary


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Spearman rank correlation; None when either side is constant or there are fewer than 3 points."""
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    from scipy import stats  # here, not at the top: measuring workers import this package, and scipy.stats takes 1 s

    return _finite(float(stats.spearmanr(x, y).statistic))


def _requested_classes(table: SampleTable, mask: np.ndarray) -> set[str]:
    """Classes with a positive requested ratio in any sample of `mask`."""
    return {name for name in table.classes if np.any(table.column(f"ratio:{name}")[mask] > 0)}


def monotonicity(table: SampleTable) -> dict[str, dict[str, Any]]:
    """Per estimated class named by the ratios: Spearman of requested ratio vs measured strength over every
    sample, and over the samples that request no other class (single-class variants and identity)."""
    result = {}
    for name in table.classes:
        if name not in CLASS_ESTIMATORS:
            continue
        ratio, strength = table.column(f"ratio:{name}"), table.column(name)
        others = [table.column(f"ratio:{other}") for other in table.classes if other != name]
        alone = np.all([column == 0 for column in others], axis=0) if others else np.ones(len(table), dtype=bool)
        result[name] = {
            "spearman": spearman(ratio, strength),
            "samples": len(table),
            "spearman_single_class": spearman(ratio[alone], strength[alone]),
            "single_class_samples": int(alone.sum()),
        }
    return result


def selectivity(table: SampleTable) -> dict[str, dict[str, Any]]:
    """For each variant that requests exactly one estimated class: how far the median normalised strength of
    every class moved from the identity variants' (all ratios 0; 0 when there is none), and the ratio of its
    own class's move to the largest rise of another class (floored at SELECTIVITY_FLOOR). Only moves towards
    degradation count: another class reading less than on the identity is not that class appearing."""
    variants = sorted(set(table.variants))
    masks = {variant: table.variant_mask(variant) for variant in variants}
    requested = {variant: _requested_classes(table, mask) for variant, mask in masks.items()}
    identity = np.zeros(len(table), dtype=bool)
    for variant in variants:
        if table.classes and not requested[variant]:
            identity |= masks[variant]
    estimated = list(CLASS_ESTIMATORS)
    baseline = {
        name: float(np.median(table.normalised(name)[identity])) if identity.any() else 0.0 for name in estimated
    }
    result = {}
    for variant in variants:
        own = requested[variant]
        if len(own) != 1 or not own <= set(CLASS_ESTIMATORS):
            continue
        (own_class,) = own
        moves = {name: float(np.median(table.normalised(name)[masks[variant]])) - baseline[name] for name in estimated}
        other_class = max((name for name in estimated if name != own_class), key=lambda name: moves[name])
        largest_rise = max(moves[other_class], 0.0)
        result[variant] = {
            "class": own_class,
            "moves": moves,
            "largest_other_class": other_class,
            "largest_other_rise": largest_rise,
            "ratio": moves[own_class] / max(largest_rise, SELECTIVITY_FLOOR),
            "baseline": "identity variants" if identity.any() else "zero",
        }
    return result


def summarise(table: SampleTable, label: str) -> dict[str, Any]:
    """Everything the report says about one set."""
    variants = {}
    for variant in sorted(set(table.variants)):
        mask = table.variant_mask(variant)
        diversity = np.frombuffer(table.diversity[variant], dtype=np.float64) if variant in table.diversity else None
        variants[variant] = {
            "samples": int(mask.sum()),
            "requested": {name: describe(table.column(f"ratio:{name}")[mask]) for name in table.classes},
            "measures": {name: describe(table.column(name)[mask]) for name in MEASURE_NAMES},
            "normalised": {name: _finite(float(np.median(table.normalised(name)[mask]))) for name in CLASS_ESTIMATORS},
            "diversity": None if diversity is None else {"groups": int(diversity.size), **describe(diversity)},
        }
    return {
        "label": label,
        "samples": len(table),
        "classes": list(table.classes),
        "variants": variants,
        "monotonicity": monotonicity(table),
        "selectivity": selectivity(table),
    }


def class_selection(table: SampleTable, name: str) -> np.ndarray:
    """The samples whose `name` strength describes that class: those requesting it when the set has ratios for
    it, else all samples."""
    if name in table.classes:
        return table.column(f"ratio:{name}") > 0
    return np.ones(len(table), dtype=bool)


def compare(table: SampleTable, other: SampleTable) -> dict[str, dict[str, Any]]:
    """Per measure: the 1-D Wasserstein distance between the two sets' distributions (in the measure's units)
    and both sets' quantiles. Class strengths compare the samples `class_selection` picks on each side."""
    from scipy import stats  # see `spearman`

    result: dict[str, dict[str, Any]] = {}
    for name in MEASURE_NAMES:
        mine, theirs = table.column(name), other.column(name)
        if name in CLASS_ESTIMATORS:
            mine, theirs = mine[class_selection(table, name)], theirs[class_selection(other, name)]
        mine, theirs = mine[np.isfinite(mine)], theirs[np.isfinite(theirs)]
        if mine.size == 0 or theirs.size == 0:
            continue
        result[name] = {
            "wasserstein": float(stats.wasserstein_distance(mine, theirs)),
            "median_shift": float(np.median(theirs) - np.median(mine)),
            "samples": [int(mine.size), int(theirs.size)],
            "quantiles": {
                f"q{round(q * 100):02d}": [float(a), float(b)]
                for q, a, b in zip(QUANTILES, np.quantile(mine, QUANTILES), np.quantile(theirs, QUANTILES))
            },
        }
    return result


def class_info() -> dict[str, dict[str, Any]]:
    """Units and reference scale of every estimated class."""
    return {name: {"units": CLASS_UNITS[name], "scale": CLASS_SCALES[name]} for name in CLASS_ESTIMATORS}
