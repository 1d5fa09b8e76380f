"""What `evaluate` found (`Report`) and writing it: the per-sample CSV (streamed), report.json, plots and
terminal tables."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from mdsd3_cli.util.atomic import AtomicFile, atomic_write
from mdsd3_cli.util.version import __version__

from .aggregate import class_info
from .estimators import DEFAULT_SEAM_GRID, ESTIMATOR_VERSIONS
from .measures import CLASS_ESTIMATORS, MEASURE_NAMES, SEAM

if TYPE_CHECKING:
    from .aggregate import SampleTable
    from .pairs import PairSource, Problem

SHOWN_PROBLEMS = 5
COLUMN_NAMES = {"noise": "noise σ", "haze": "haze veil", "rain": "rain", "low_light": "dark EV", "blur": "blur"}
"""Terminal column headers of the class strengths (units: see CLASS_UNITS)."""
REPORT_VERSION = 1
"""report.json's format version."""
SELECTIVITY_CAPTION = (
    "selectivity: the variant's own class move over the largest rise of another class; "
    "a class reading lower than on the identity is not counted"
)


@dataclass
class Report:
    """Everything `evaluate` found. `summary` and `against` are what report.json holds per set; `tables` has
    the per-sample numbers of every set by label (the dataset's first)."""

    summary: dict[str, Any]
    against: list[dict[str, Any]] = field(default_factory=list)
    distances: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    tables: dict[str, SampleTable] = field(default_factory=dict)
    seam_grid: int = DEFAULT_SEAM_GRID

    def variant(self, name: str) -> dict[str, Any]:
        """The dataset's statistics of one variant (samples, requested ratios, measures, normalised, diversity)."""
        return self.summary["variants"][name]

    def samples(self, label: str | None = None) -> list[dict[str, Any]]:
        """Per-sample rows of one set (default: the dataset)."""
        table = self.tables[label or self.summary["label"]]
        return [table.row(index) for index in range(len(table))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "report_version": REPORT_VERSION,
            "mdsd3_version": __version__,
            "estimators": ESTIMATOR_VERSIONS,
            "classes": class_info(),
            "seam_grid": self.seam_grid,
            "dataset": self.summary,
            "against": self.against,
            "distances": self.distances,
            "problems": [{"path": problem.path, "reason": problem.reason} for problem in self.problems],
        }


class SampleCsv:
    """samples.csv, one row per measured pair of every set, written as results arrive into a temp file that
    `close()` renames onto samples.csv (`atomic.AtomicFile`: a link found there is replaced, never followed);
    `discard()` leaves samples.csv as it was."""

    def __init__(self, path: Path, sources: list[PairSource]) -> None:
        classes = list(dict.fromkeys(name for source in sources for name in source.classes))
        self.columns = [
            "set",
            "key",
            "variant",
            "folder",
            "repeat",
            *(f"ratio:{name}" for name in classes),
            *MEASURE_NAMES,
            *(f"{name}_norm" for name in CLASS_ESTIMATORS),
        ]
        self._atomic = AtomicFile(path)
        self._file = io.TextIOWrapper(self._atomic.file, encoding="utf-8", newline="")
        self._writer = csv.DictWriter(self._file, self.columns, restval="")
        self._writer.writeheader()

    def write(self, label: str, table: SampleTable, newest: int) -> None:
        """Append the `newest` rows of `table`."""
        for index in range(len(table) - newest, len(table)):
            self._writer.writerow({"set": label, **table.row(index)})

    def close(self) -> None:
        self._file.flush()
        self._file.detach()
        self._atomic.commit()

    def discard(self) -> None:
        self._file.detach()
        self._atomic.discard()


def _json_safe(value: Any) -> Any:
    """Non-finite floats (PSNR of identical images) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_report(report: Report, out_dir: Path) -> list[Path]:
    """OUT_DIR/report.json and the plots; returns the files written (each through `atomic.atomic_write`)."""
    path = out_dir / "report.json"
    atomic_write(path, (json.dumps(_json_safe(report.to_dict()), indent=2, allow_nan=False) + "\n").encode())
    return [path, *write_plots(report, out_dir)]


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    """strength_vs_ratio.png (each class's measured strength against its requested ratio, when the dataset
    has ratios), normalised_by_variant.png, and against_<label>.png per compared set."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    written = []
    label = report.summary["label"]
    table = report.tables[label]
    classes = [name for name in table.classes if name in CLASS_ESTIMATORS]
    if classes:
        figure, axes = pyplot.subplots(1, len(classes), figsize=(4 * len(classes), 3.6), squeeze=False)
        for axis, name in zip(axes[0], classes):
            ratio, strength = table.column(f"ratio:{name}"), table.column(name)
            axis.scatter(ratio, strength, s=8, alpha=0.5)
            levels = np.unique(ratio)
            if levels.size <= 20:
                axis.plot(
                    levels, [np.median(strength[ratio == level]) for level in levels], "k-o", ms=3, label="median"
                )
                axis.legend(loc="upper left", fontsize=8)
            rho = report.summary["monotonicity"][name]["spearman"]
            axis.set_title(f"{name} (Spearman {rho:.2f})" if rho is not None else name)
            axis.set_xlabel(f"requested {name} ratio")
            axis.set_ylabel(f"measured {name}")
        written.append(_save(figure, out_dir / "strength_vs_ratio.png", pyplot))
    variants = list(report.summary["variants"])
    grid = np.array(
        [[report.summary["variants"][v]["normalised"][name] or 0.0 for name in CLASS_ESTIMATORS] for v in variants]
    )
    figure, axis = pyplot.subplots(figsize=(1.2 * len(CLASS_ESTIMATORS) + 2, 0.4 * len(variants) + 1.5))
    image = axis.imshow(grid, cmap="viridis", aspect="auto")
    axis.set_xticks(range(len(CLASS_ESTIMATORS)), list(CLASS_ESTIMATORS))
    axis.set_yticks(range(len(variants)), variants)
    for (row, column), value in np.ndenumerate(grid):
        axis.text(column, row, f"{value:.2f}", ha="center", va="center", color="w", fontsize=8)
    figure.colorbar(image, label="median normalised strength")
    axis.set_title("normalised strength by variant")
    written.append(_save(figure, out_dir / "normalised_by_variant.png", pyplot))
    for other in report.against:
        written.append(_against_plot(table, report.tables[other["label"]], label, other["label"], out_dir, pyplot))
    return written


def _against_plot(
    table: SampleTable, other: SampleTable, label: str, other_label: str, out_dir: Path, pyplot: Any
) -> Path:
    from .aggregate import class_selection

    names = ["psnr", *CLASS_ESTIMATORS]
    figure, axes = pyplot.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for axis, name in zip(axes[0], names):
        mine, theirs = table.column(name), other.column(name)
        if name in CLASS_ESTIMATORS:
            mine, theirs = mine[class_selection(table, name)], theirs[class_selection(other, name)]
        mine, theirs = mine[np.isfinite(mine)], theirs[np.isfinite(theirs)]
        if mine.size and theirs.size:
            bins = np.histogram_bin_edges(np.concatenate([mine, theirs]), bins=20)
            axis.hist(mine, bins=bins, alpha=0.5, density=True, label=label)
            axis.hist(theirs, bins=bins, alpha=0.5, density=True, label=other_label)
        axis.set_title(name)
        axis.legend(fontsize=7)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in other_label)
    return _save(figure, out_dir / f"against_{safe}.png", pyplot)


def _save(figure: Any, path: Path, pyplot: Any) -> Path:
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, dpi=100, format="png"))
    pyplot.close(figure)
    return path


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def variants_table(summary: dict[str, Any]) -> Table:
    """Per variant: count, median PSNR/SSIM/seam ratio, each class's median strength in its units, repeat
    difference."""
    table = Table(title=f"mdsd3 evaluate — {escape(summary['label'])}: medians per variant")
    for column in ("variant", "pairs", "PSNR dB", "SSIM", "seam", *COLUMN_NAMES.values(), "repeat diff"):
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=column == "variant")
    for variant, stats in summary["variants"].items():
        measures = stats["measures"]
        strengths = [_number(measures[name].get("median")) for name in CLASS_ESTIMATORS]
        diversity = stats["diversity"]
        table.add_row(
            escape(variant),
            str(stats["samples"]),
            _number(measures["psnr"].get("median"), 1),
            _number(measures["ssim"].get("median"), 3),
            _number(measures[SEAM].get("median")),
            *strengths,
            "-" if diversity is None else _number(diversity.get("median")),
        )
    return table


def classes_table(summary: dict[str, Any]) -> Table:
    """Per class: Spearman ratio-vs-strength, and selectivity of its single-class variants."""
    table = Table(title="monotonicity and selectivity", caption=SELECTIVITY_CAPTION)
    for column in ("class", "Spearman all", "Spearman single", "variant", "selectivity", "largest other rise"):
        table.add_column(column, no_wrap=column in ("class", "variant"))
    for name, result in summary["monotonicity"].items():
        picks = [(v, s) for v, s in summary["selectivity"].items() if s["class"] == name] or [(None, None)]
        for variant, chosen in picks:
            table.add_row(
                escape(name),
                _number(result["spearman"]),
                _number(result["spearman_single_class"]),
                "-" if variant is None else escape(variant),
                "-" if chosen is None else f"{chosen['ratio']:.1f}x",
                "-"
                if chosen is None
                else f"{escape(chosen['largest_other_class'])} {chosen['largest_other_rise']:+.2f}",
            )
    return table


def distances_table(label: str, distances: dict[str, Any]) -> Table:
    """Per measure: Wasserstein distance and medians of both sets."""
    table = Table(title=f"against {escape(label)}")
    for column in ("measure", "Wasserstein", "median (dataset)", "median (against)", "median shift"):
        table.add_column(column)
    for name, result in distances.items():
        table.add_row(
            name,
            _number(result["wasserstein"], 3),
            _number(result["quantiles"]["q50"][0], 3),
            _number(result["quantiles"]["q50"][1], 3),
            _number(result["median_shift"], 3),
        )
    return table


def problem_lines(report: Report) -> list[str]:
    """A count and the first few problems, escaped for rich."""
    if not report.problems:
        return []
    lines = [f"[yellow]{len(report.problems)} file(s) or record(s) left out[/] (all listed in report.json):"]
    lines += [f"  {escape(problem.path)}: {escape(problem.reason)}" for problem in report.problems[:SHOWN_PROBLEMS]]
    return lines
