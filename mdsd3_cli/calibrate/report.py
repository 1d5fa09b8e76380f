"""What a calibration reports: report.json's schema, the summary table and the plot (curves and histograms)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel
from rich.table import Table

Status = Literal["calibrated", "absent", "not_separable", "no_estimator", "unused"]


class Distribution(BaseModel):
    """A sample of strengths: its size, mean, standard deviation and quantiles (5, 25, 50, 75, 95 %)."""

    count: int
    mean: float
    std: float
    quantiles: dict[str, float]
    values: list[float]

    @classmethod
    def of(cls, values: np.ndarray) -> Distribution:
        values = np.asarray(values, dtype=np.float64)
        levels = (0.05, 0.25, 0.5, 0.75, 0.95)
        return cls(
            count=int(values.size),
            mean=float(values.mean()),
            std=float(values.std()),
            quantiles={f"q{round(level * 100):02d}": float(q) for level, q in zip(levels, np.quantile(values, levels))},
            values=[float(value) for value in values],
        )


class CurveInfo(BaseModel):
    """The measured strength(ratio) curve: per-probe strengths, median and interquartile band, where it falls."""

    ratios: list[float]
    strengths: list[list[float]]
    """[probe][grid point], in estimator units."""
    median: list[float]
    q25: list[float]
    q75: list[float]
    monotone: list[float]
    """The non-decreasing fit of the median the inversion uses."""
    decreasing: list[tuple[float, float]]
    """Ratio intervals over which the median falls (not monotone)."""
    rise: float
    spread: float


class Check(BaseModel):
    """A check set's strengths and its 1-Wasserstein distance to the reference."""

    strengths: Distribution
    wasserstein: float
    """In estimator units."""
    wasserstein_of_spread: float
    """The distance as a fraction of the reference's standard deviation."""


class ClassResult(BaseModel):
    """One class: calibrated, or why it was left as given."""

    name: str
    status: Status
    reason: str | None = None
    units: str | None = None
    variants: list[str]
    """The variants using the class (rewritten when calibrated)."""
    given: list[Any]
    """The class's ratio in each of those variants as given."""
    quantiles: list[float] | None = None
    below_range: float | None = None
    above_range: float | None = None
    reference: Distribution | None = None
    curve: CurveInfo | None = None
    before: Check | None = None
    after: Check | None = None


class CalibrationReport(BaseModel):
    """report.json."""

    recipe: str
    reference: str
    reference_layout: str
    out: str
    probes: list[str]
    grid: list[float]
    check_samples: int
    classes: list[ClassResult]
    problems: list[str]
    files: list[str]
    """The files written: the recipe, this report and (when a class was calibrated) the plot."""
    timings_s: dict[str, float]
    versions: dict[str, Any]

    @property
    def left_as_given(self) -> list[ClassResult]:
        return [result for result in self.classes if result.status != "calibrated"]


def summary_table(report: CalibrationReport) -> Table:
    """One row per class: what happened, the reference's median, W1 before and after (units and fraction)."""
    table = Table(title=f"mdsd3 calibrate — {Path(report.out).name}")
    for column in (
        "class",
        "status",
        "variants",
        "reference median",
        "W1 as given",
        "W1 calibrated",
        "after/before",
        "calibrated ratio q10 / q50 / q90",
    ):
        table.add_column(column, justify="left" if column in ("class", "status", "variants") else "right")
    for result in report.classes:
        before, after = result.before, result.after
        cells = [
            result.name,
            result.status if result.reason is None else f"{result.status}: {result.reason}",
            ", ".join(result.variants) or "-",
            "-" if result.reference is None else f"{result.reference.quantiles['q50']:.3g}",
            "-" if before is None else f"{before.wasserstein:.3g} ({before.wasserstein_of_spread:.0%})",
            "-" if after is None else f"{after.wasserstein:.3g} ({after.wasserstein_of_spread:.0%})",
            "-"
            if before is None or after is None or before.wasserstein == 0
            else f"{after.wasserstein / before.wasserstein:.0%}",
            "-" if result.quantiles is None else " / ".join(f"{result.quantiles[i]:.2f}" for i in (1, 5, 9)),
        ]
        table.add_row(*cells)
    return table


def plot_png(report: CalibrationReport) -> bytes | None:
    """The plot, as PNG bytes: each calibrated class's curve (per probe, median, interquartile band) and the
    histograms of the reference, the recipe as given and the calibrated one; None when no class was calibrated."""
    results = [result for result in report.classes if result.status == "calibrated"]
    if not results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(len(results), 2, figsize=(9, 3.2 * len(results)), squeeze=False)
    for (curve_axis, histogram_axis), result in zip(axes, results):
        curve = result.curve
        for row in curve.strengths:
            curve_axis.plot(curve.ratios, row, color="0.75", lw=0.8)
        curve_axis.fill_between(curve.ratios, curve.q25, curve.q75, alpha=0.3, label="interquartile")
        curve_axis.plot(curve.ratios, curve.median, "k-o", ms=3, label="median")
        for low, high in curve.decreasing:
            curve_axis.axvspan(low, high, color="red", alpha=0.15)
        curve_axis.set_xlabel(f"{result.name} ratio")
        curve_axis.set_ylabel(result.units or "strength")
        curve_axis.set_title(f"{result.name}: strength(ratio)")
        curve_axis.legend(fontsize=7)
        sets = {
            "reference": result.reference,
            "as given": result.before and result.before.strengths,
            "calibrated": result.after and result.after.strengths,
        }
        values = [np.array(item.values) for item in sets.values() if item is not None]
        bins = np.histogram_bin_edges(np.concatenate(values), bins=20)
        for label, item in sets.items():
            if item is not None:
                histogram_axis.hist(item.values, bins=bins, alpha=0.45, density=True, label=label)
        histogram_axis.set_xlabel(result.units or "strength")
        histogram_axis.set_title(f"{result.name}: strength distributions")
        histogram_axis.legend(fontsize=7)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, dpi=90, format="png")
    pyplot.close(figure)
    return png.getvalue()


def report_json(report: CalibrationReport) -> bytes:
    """report.json's bytes."""
    return (report.model_dump_json(indent=2) + "\n").encode()
