"""The reference set's strengths per class, measured by `evaluate` (its readers, estimators and messages).

Three layouts: an mdsd3 output (each class from its single-class samples), a folder with clean/ and
degraded/<class>/ (one folder per class, images matched by name), or clean/ and a flat degraded/ (one set; the
classes it holds are the ones named with `--classes`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from mdsd3_cli.dataset.names import CLEAN_FOLDER, DEGRADED_FOLDER, is_generate_output
from mdsd3_cli.evaluate import CLASS_ESTIMATORS, EvaluateError, Problem, evaluate_dataset


@dataclass
class ReferenceStrengths:
    """Each present class's measured strengths (estimator units), why the others are absent, and what was
    left out of the measurement."""

    layout: str
    strengths: dict[str, np.ndarray] = field(default_factory=dict)
    absent: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def _finite(values: np.ndarray) -> np.ndarray:
    """The finite strengths (a copy)."""
    return values[np.isfinite(values)]


def _single_class(path: Path, classes: list[str], workers: int | None, console: Console | None) -> ReferenceStrengths:
    """An mdsd3 output: a class's strengths are those of the samples that request it and no other class."""
    report = evaluate_dataset(path, workers=workers, console=console)
    table = report.tables[report.summary["label"]]
    found = ReferenceStrengths("mdsd3 output", problems=list(report.problems))
    requested = {name: table.column(f"ratio:{name}") > 0 for name in table.classes}
    for name in classes:
        if name not in requested:
            found.absent[name] = "no sample of the reference requests it"
            continue
        alone = requested[name] & ~np.any([requested[other] for other in requested if other != name], axis=0)
        if not alone.any():
            found.absent[name] = "no sample of the reference requests it alone (only mixed with other classes)"
        else:
            found.strengths[name] = _finite(table.column(name)[alone])
    return found


def _class_folders(
    path: Path, folders: list[Path], classes: list[str], workers: int | None, console: Console | None
) -> ReferenceStrengths:
    """clean/ with degraded/<class>/: each class folder measured against clean/ as evaluate --pairs does."""
    found = ReferenceStrengths("clean/ + degraded/<class>/")
    names = {folder.name for folder in folders}
    found.problems += [
        Problem(str(entry), "not a class folder of the recipe; left out")
        for entry in sorted((path / DEGRADED_FOLDER).iterdir())
        if entry.name not in names
    ]
    for name in classes:
        if name not in names:
            found.absent[name] = f"no folder {DEGRADED_FOLDER}/{name}/ in the reference"
            continue
        report = evaluate_dataset(
            pairs=(path / CLEAN_FOLDER, path / DEGRADED_FOLDER / name), workers=workers, console=console
        )
        found.problems += report.problems
        found.strengths[name] = _finite(report.tables[report.summary["label"]].column(name))
    return found


def measure_reference(
    path: Path,
    classes: list[str],
    known: list[str],
    named: bool,
    workers: int | None = None,
    console: Console | None = None,
) -> ReferenceStrengths:
    """Strengths of `classes` (those with an estimator) in the reference at `path`; `known`: every class of the
    recipe (a degraded/ sub folder named after one makes the per-class layout); `named`: the user listed the
    classes (a flat clean/ + degraded/ set needs that). EvaluateError, with evaluate's messages, when the
    reference has no usable pair or the classes of a flat set are not named."""
    found = _measure(Path(path), [name for name in classes if name in CLASS_ESTIMATORS], known, named, workers, console)
    for name in [name for name, values in found.strengths.items() if values.size == 0]:
        del found.strengths[name]
        found.absent[name] = "no finite strength measured in the reference"
    return found


def _measure(
    path: Path, classes: list[str], known: list[str], named: bool, workers: int | None, console: Console | None
) -> ReferenceStrengths:
    """`measure_reference` for the classes with an estimator, by the reference's layout."""
    if is_generate_output(path):
        return _single_class(path, classes, workers, console)
    clean, degraded = path / CLEAN_FOLDER, path / DEGRADED_FOLDER
    folders = (
        sorted(entry for entry in degraded.iterdir() if entry.is_dir() and entry.name in known)
        if clean.is_dir() and degraded.is_dir()
        else []
    )
    if folders:
        return _class_folders(path, folders, classes, workers, console)
    if not named and clean.is_dir() and degraded.is_dir():
        raise EvaluateError(
            f"{path}: clean/ + degraded/ holds one set of pairs with no class folders "
            "(degraded/<class>/); name the class(es) it shows with --classes, e.g. --classes haze"
        )
    report = evaluate_dataset(path, workers=workers, console=console)
    table = report.tables[report.summary["label"]]
    return ReferenceStrengths(
        "clean/ + degraded/", {name: _finite(table.column(name)) for name in classes}, problems=list(report.problems)
    )
