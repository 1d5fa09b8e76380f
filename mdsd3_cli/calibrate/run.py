"""`calibrate`: measure the reference, sweep the model on probe photos, invert by quantile mapping, verify on a
check set, and write the calibrated recipe with its report and plot."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from mdsd3_cli.evaluate import CLASS_ESTIMATORS, CLASS_SCALES, CLASS_UNITS, ESTIMATOR_VERSIONS
from mdsd3_cli.pipeline.synthesizer import Synthesizer
from mdsd3_cli.recipe.generate import Recipe, load_recipe_data, parse_recipe
from mdsd3_cli.util.atomic import atomic_write_together
from mdsd3_cli.util.names import unknown_class_message
from mdsd3_cli.util.version import __version__

from .fit import MIN_RISE, Curve, quantile_mapping, wasserstein
from .probe import Probe, check_jobs, pick_probes, run_jobs, sweep
from .recipe_edit import calibrated_data, recipe_text, variants_using
from .reference import ReferenceStrengths, measure_reference
from .report import CalibrationReport, Check, ClassResult, CurveInfo, Distribution, plot_png, report_json

EXIT_OK, EXIT_LEFT_AS_GIVEN = 0, 1


@dataclass(frozen=True)
class Outputs:
    """The files a calibration writes: the recipe, and beside it <stem>.report.json and <stem>.png."""

    recipe: Path

    @property
    def report(self) -> Path:
        return self.recipe.with_name(f"{self.recipe.stem}.report.json")

    @property
    def plot(self) -> Path:
        return self.recipe.with_name(f"{self.recipe.stem}.png")

    def refuse_existing(self, overwrite: bool, reference: Path, inputs: Sequence[str]) -> None:
        """FileExistsError naming a file that exists (unless `overwrite`); ValueError when the outputs would land
        inside the reference or one of the recipe's input folders (the plot would be read as an image)."""
        folder = Path(self.recipe).resolve().parent
        if folder.is_relative_to(Path(reference).resolve()):
            raise ValueError(f"--out {self.recipe} is inside the reference folder {reference}; write it elsewhere")
        for raw in inputs:
            if Path(raw).is_dir() and folder.is_relative_to(Path(raw).resolve()):
                raise ValueError(
                    f"--out {self.recipe} is inside the recipe's input folder {raw} (its plot would "
                    "become an input); write it elsewhere"
                )
        if not overwrite:
            for path in (self.recipe, self.report, self.plot):
                if path.exists() or path.is_symlink():
                    raise FileExistsError(f"{path} exists; choose another --out or pass --overwrite")


def _chosen_classes(recipe: Recipe, classes: Sequence[str] | None) -> list[str]:
    """The classes to calibrate: those named (checked against the recipe's), else every class a variant uses."""
    known = recipe.classes()
    if classes is None:
        return [name for name in known if variants_using(recipe, name)]
    if not classes:
        raise ValueError(f"--classes names no class; the recipe's classes are {', '.join(known)}")
    for name in classes:
        if name not in known:
            raise ValueError(f"--classes: {unknown_class_message(name, known)}")
    return list(dict.fromkeys(classes))


def _given(recipe: Recipe, name: str) -> tuple[list[str], list]:
    variants = variants_using(recipe, name)
    return [variant.name for variant in variants], [
        variant.model_dump(mode="json")["classes"][name] for variant in variants
    ]


def _left_as_given(recipe: Recipe, name: str, found: ReferenceStrengths) -> ClassResult | None:
    """The result of a class that needs no sweep to be left as given, else None."""
    variants, given = _given(recipe, name)
    status, reason = None, None
    if name not in CLASS_ESTIMATORS:
        status, reason = "no_estimator", f"evaluate has no strength estimator for {name!r}"
    elif not variants:
        status, reason = "unused", "no variant of the recipe uses it"
    elif name in found.absent:
        status, reason = "absent", found.absent[name]
    if status is None:
        return None
    return ClassResult(name=name, status=status, reason=reason, variants=variants, given=given)


def _curve_info(curve: Curve) -> CurveInfo:
    return CurveInfo(
        ratios=curve.ratios.tolist(),
        strengths=curve.strengths.tolist(),
        median=curve.median.tolist(),
        q25=curve.low.tolist(),
        q75=curve.high.tolist(),
        monotone=curve.monotone.tolist(),
        decreasing=curve.decreasing_intervals(),
        rise=curve.rise(),
        spread=curve.spread(),
    )


def _fit_class(recipe: Recipe, name: str, reference: np.ndarray, curve: Curve) -> ClassResult:
    """Quantile mapping of one swept class, or not_separable when the curve does not rise clearly."""
    variants, given = _given(recipe, name)
    result = ClassResult(
        name=name,
        status="calibrated",
        units=CLASS_UNITS[name],
        variants=variants,
        given=given,
        reference=Distribution.of(reference),
        curve=_curve_info(curve),
    )
    floor = MIN_RISE * CLASS_SCALES[name]
    if curve.rise() < floor or curve.rise() <= curve.spread():
        result.status = "not_separable"
        result.reason = (
            f"the model's median {name} rises by {curve.rise():.3g} from ratio 0 to 1, below "
            f"{max(floor, curve.spread()):.3g} (a tenth of the class scale, or the spread between probes)"
        )
        return result
    mapping = quantile_mapping(reference, curve)
    result.quantiles, result.below_range, result.above_range = (
        mapping.quantiles,
        mapping.below_range,
        mapping.above_range,
    )
    return result


def _check(
    synth: Synthesizer,
    recipe: Recipe,
    probes: list[Probe],
    results: list[ClassResult],
    count: int,
    label: str,
    references: dict[str, np.ndarray],
    console: Console | None,
) -> dict[str, Check]:
    """The check set of every result's class under `recipe` (as given or calibrated), measured against the
    reference. Each class draws from the variants the calibration rewrote (`result.variants`), found by name: a
    calibrated ratio of all zeros (a reference without the class) still has its check set."""
    jobs = {
        result.name: check_jobs(
            recipe,
            synth,
            probes,
            result.name,
            [variant for variant in recipe.variants if variant.name in result.variants],
            count,
        )
        for result in results
    }
    measured = iter(
        run_jobs(synth, probes, [job for batch in jobs.values() for job in batch], f"calibrate: check {label}", console)
    )
    checks = {}
    for name, batch in jobs.items():
        strengths = np.array([next(measured)[name] for _ in batch])
        distance = wasserstein(strengths, references[name])
        spread = float(np.std(references[name]))
        checks[name] = Check(
            strengths=Distribution.of(strengths),
            wasserstein=distance,
            wasserstein_of_spread=distance / spread if spread > 0 else float("inf"),
        )
    return checks


def calibrate(
    config: Path,
    reference: Path,
    out: Path,
    classes: Sequence[str] | None = None,
    probe: int = 4,
    grid: int = 5,
    check: int = 16,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    workers: int | None = None,
    console: Console | None = None,
    synthesizer: Synthesizer | None = None,
) -> CalibrationReport:
    """Calibrate recipe `config` against the paired set `reference` and write the calibrated recipe to `out`,
    with <stem>.report.json and <stem>.png beside it. `probe` photos of the recipe's inputs, `grid` ratios from
    0 to 1, `check` samples per class in each check set (0: no verification). `synthesizer`: a loaded
    `mdsd3_cli.Synthesizer` with the recipe's model and settings to reuse (else one is loaded).

    ValueError (RecipeError, EvaluateError, ...) for bad options, recipe or reference; FileExistsError for an
    output that exists without `overwrite`."""
    if probe < 1 or grid < 2 or check < 0:
        raise ValueError(f"need probe >= 1, grid >= 2 and check >= 0; got {probe}, {grid} and {check}")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    recipe, data = load_recipe_data(config, overrides)
    outputs = Outputs(Path(out))
    outputs.refuse_existing(overwrite, Path(reference), recipe.input_paths())
    names = _chosen_classes(recipe, classes)
    found = measure_reference(
        Path(reference), names, recipe.classes(), named=classes is not None, workers=workers, console=console
    )
    timings["reference"] = time.perf_counter() - start
    results = {name: _left_as_given(recipe, name, found) for name in names}
    swept = [name for name, result in results.items() if result is None]
    probes: list[Probe] = []
    ratios = np.linspace(0.0, 1.0, grid)
    checks_before, checks_after = {}, {}
    skipped: list[str] = []
    if swept:
        synth = synthesizer if synthesizer is not None else Synthesizer(recipe)
        _same_settings(synth.recipe, recipe)
        probes, skipped = pick_probes(recipe, probe)
        mark = time.perf_counter()
        strengths = sweep(synth, probes, swept, ratios, console)
        timings["sweep"] = time.perf_counter() - mark
        for name in swept:
            results[name] = _fit_class(recipe, name, found.strengths[name], Curve(ratios, strengths[name]))
    calibrated = [result for result in results.values() if result.status == "calibrated"]
    new_data = calibrated_data(data, recipe, {result.name: result.quantiles for result in calibrated}, outputs.recipe)
    text = recipe_text(
        new_data,
        f"Calibrated by mdsd3 calibrate from {config} against the reference {reference}.\n"
        f"Report and plot: {outputs.report.name}, {outputs.plot.name}. The given recipe's comments are "
        "not kept.",
        outputs.recipe,
    )
    if calibrated and check:
        new_recipe = parse_recipe(new_data, outputs.recipe)
        mark = time.perf_counter()
        checks_before = _check(synth, recipe, probes, calibrated, check, "as given", found.strengths, console)
        checks_after = _check(synth, new_recipe, probes, calibrated, check, "calibrated", found.strengths, console)
        timings["check"] = time.perf_counter() - mark
    for result in calibrated:
        result.before, result.after = checks_before.get(result.name), checks_after.get(result.name)
    timings["total"] = time.perf_counter() - start
    report = CalibrationReport(
        recipe=str(config),
        reference=str(reference),
        reference_layout=found.layout,
        out=str(outputs.recipe),
        probes=[probe.key for probe in probes],
        grid=ratios.tolist(),
        check_samples=check,
        classes=[results[name] for name in names],
        files=[str(path) for path in (outputs.recipe, outputs.report, *([outputs.plot] if calibrated else []))],
        problems=[f"{problem.path}: {problem.reason}" for problem in found.problems] + skipped,
        timings_s=timings,
        versions={
            "mdsd3": __version__,
            "estimators": {name: ESTIMATOR_VERSIONS[name] for name in names if name in ESTIMATOR_VERSIONS},
        },
    )
    plot = plot_png(report)
    atomic_write_together(
        {
            outputs.recipe: text.encode(),
            outputs.report: report_json(report),
            **({outputs.plot: plot} if plot is not None else {}),
        }
    )
    return report


def _same_settings(loaded: Recipe, recipe: Recipe) -> None:
    """ValueError when a given Synthesizer samples with other settings than the recipe (model, size, sampling)."""

    def settings(item: Recipe) -> dict:
        identity = item.identity()
        return {"model": identity["model"], "input": identity["input"], "sampling": item.sampling.model_dump()}

    if settings(loaded) != settings(recipe):
        raise ValueError(
            "the synthesizer given samples with other settings than the recipe "
            f"({settings(loaded)} vs {settings(recipe)})"
        )
