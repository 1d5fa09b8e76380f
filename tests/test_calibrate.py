"""`mdsd3 calibrate` on the shipped mini model: a reference made from the held-out photos (chelsea, coffee) with the
synthetic degradations at per-sample strengths from skewed distributions; after calibration the check set's
strengths are closer to the reference's (1-Wasserstein) for haze, noise and low light; a second calibration is
stable; a class the reference lacks is reported and left as given; the quantile ratio draw; the inversion on
synthetic curves; bad references and outputs.

The model runs at 64 px (mini's sampling settings from configs/demo.yaml otherwise) with one probe photo, a
4-point grid and 4 check samples per class, so the file stays near a minute and a half on two busy cores.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import yaml
from click.testing import Result
from PIL import Image

from mdsd3_cli.calibrate import calibrate
from mdsd3_cli.calibrate.fit import Curve, invert, isotonic, quantile_mapping
from mdsd3_cli.evaluate import EvaluateError
from mdsd3_cli.generate.plan import build_plan
from mdsd3_cli.pipeline.requests import draw_ratios
from mdsd3_cli.recipe.generate import QuantileRatio, RecipeError, load_recipe, parse_recipe

from .helpers import EXAMPLE_PHOTOS, REPO, mdsd3, write_recipe

MATCHED = ("haze", "noise", "low_light")


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_reference = _script("make_reference").write_reference
"""clean/<photo>_<i>.png and degraded/<class>/<photo>_<i>.png from chelsea and coffee (held out of mini's training)
at 128 px, 24 pairs per class at skewed strengths (scripts/make_reference.py)."""


def _write_recipe(folder: Path) -> Path:
    """configs/demo.yaml at 64 px on two of mini's training photos (the probes), its output never written."""
    photos = folder / "photos"
    photos.mkdir(parents=True)
    for name in ("rocket.jpg", "astronaut.jpg"):
        (photos / name).write_bytes((EXAMPLE_PHOTOS / name).read_bytes())
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    return write_recipe(folder / "recipe.yaml", "input.paths=[photos]", "input.size=64", "output.dir=out", base=demo)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    return _write_recipe(root / "recipe"), write_reference(root / "reference"), root


@pytest.fixture(scope="module")
def synth(setup):
    from mdsd3_cli import Synthesizer

    return Synthesizer(load_recipe(setup[0]))


@pytest.fixture(scope="module")
def calibrated(setup, synth):
    recipe, reference, root = setup
    out = root / "result" / "calibrated.yaml"
    report = calibrate(
        recipe, reference, out, classes=[*MATCHED, "rain"], probe=1, grid=4, check=4, workers=1, synthesizer=synth
    )
    return report, out


def test_calibration_brings_generated_strengths_closer_to_the_reference(calibrated, setup):
    report, out = calibrated
    results = {result.name: result for result in report.classes}
    for name in MATCHED:
        result = results[name]
        assert result.status == "calibrated", result.reason
        ratio = result.after.wasserstein / result.before.wasserstein
        print(
            f"{name}: W1 {result.before.wasserstein:.4g} -> {result.after.wasserstein:.4g} ({ratio:.0%}), "
            f"{result.after.wasserstein_of_spread:.0%} of the reference's spread"
        )
        assert ratio <= 0.3, (name, ratio)
        assert result.after.strengths.count == result.before.strengths.count == 4
    written = load_recipe(out)
    given = load_recipe(setup[0])
    for variant, before in zip(written.variants, given.variants):
        for name, spec in variant.classes.items():
            if name in MATCHED:
                assert isinstance(spec, QuantileRatio) and spec.quantiles == results[name].quantiles
            else:
                assert spec == before.classes[name]
    assert written.input_paths() == given.input_paths() and written.output_dir() == given.output_dir()
    saved = json.loads(out.with_name("calibrated.report.json").read_text())
    assert [entry["name"] for entry in saved["classes"]] == [*MATCHED, "rain"]
    assert out.with_name("calibrated.png").stat().st_size > 0


def test_a_class_missing_from_the_reference_is_reported_and_left_as_given(calibrated):
    report, out = calibrated
    rain = next(result for result in report.classes if result.name == "rain")
    assert rain.status == "absent" and "degraded/rain" in rain.reason
    assert rain.quantiles is None and rain.after is None
    variants = {variant["name"]: variant["classes"] for variant in yaml.safe_load(out.read_text())["variants"]}
    assert variants["rain"]["rain"] == 1.0 and variants["rain_haze"]["rain"] == 1.0


def test_calibrating_twice_is_stable(calibrated, setup, synth):
    report, out = calibrated
    again = calibrate(
        out,
        setup[1],
        out.with_name("twice.yaml"),
        classes=["haze"],
        probe=1,
        grid=4,
        check=0,
        workers=1,
        synthesizer=synth,
    )
    first = next(result for result in report.classes if result.name == "haze").quantiles
    second = again.classes[0].quantiles
    assert np.max(np.abs(np.subtract(first, second))) <= 0.02


def test_quantile_ratio_draw_is_deterministic_per_seed_and_within_0_1(tmp_path):
    data = {
        "model": {"base": "tiny", "classes": ["rain", "haze"]},
        "input": {"paths": [str(EXAMPLE_PHOTOS)]},
        "output": {"dir": str(tmp_path / "out")},
        "variants": [
            {"name": "q", "classes": {"haze": {"quantiles": [0.0, 0.05, 0.1, 0.6, 1.0]}, "rain": 0.5}, "repeats": 50},
            {"name": "range", "classes": {"haze": [0.2, 0.7]}},
            {"name": "as_quantiles", "classes": {"haze": {"quantiles": [0.2, 0.7]}}},
        ],
    }
    recipe = parse_recipe(data, tmp_path / "r.yaml")
    sources = [(f"k{i}", tmp_path / f"k{i}.png") for i in range(4)]
    first, second = build_plan(recipe, sources), build_plan(recipe, sources)
    assert [item.request.ratios for item in first] == [item.request.ratios for item in second]
    hazes = np.array([item.request.ratios["haze"] for item in first if item.variant == "q"])
    assert hazes.min() >= 0.0 and hazes.max() <= 1.0 and len(set(hazes.tolist())) == len(hazes)
    assert 0.35 <= np.mean(hazes <= 0.1) <= 0.65  # half the probability mass lies below the median quantile 0.1
    assert all(item.request.ratios["rain"] == 0.5 for item in first if item.variant == "q")
    ranged, quantiled = recipe.variants[1], recipe.variants[2]
    for seed in range(20):
        assert draw_ratios(ranged, ["rain", "haze"], seed) == pytest.approx(
            draw_ratios(quantiled, ["rain", "haze"], seed)
        )
    for bad in ({"quantiles": [0.5, 0.2]}, {"quantiles": [0.1]}, {"quantiles": [0, 1.5]}, {"levels": [0, 1]}):
        data["variants"][0]["classes"]["haze"] = bad
        with pytest.raises(RecipeError, match="variants.0.classes.haze"):
            parse_recipe(data, tmp_path / "r.yaml")


def test_quantile_mapping_inverts_synthetic_monotone_curves():
    ratios = np.linspace(0, 1, 11)
    truth = lambda r: 0.5 + 1.5 * r + 1.5 * r**2  # noqa: E731  strength as a function of ratio
    curve = Curve(ratios, np.stack([truth(ratios) - 0.05, truth(ratios), truth(ratios) + 0.05]))
    wanted = np.random.default_rng(0).beta(1.5, 5, 4000)  # the ratios that made the reference
    mapping = quantile_mapping(truth(wanted), curve)
    expected = np.quantile(wanted, np.linspace(0, 1, 11))
    assert np.all(np.diff(mapping.quantiles) >= 0)
    assert np.max(np.abs(np.array(mapping.quantiles) - expected)) < 0.01  # chords of a parabola
    assert mapping.below_range == 0 and mapping.above_range == 0
    beyond = quantile_mapping(np.array([0.1, 0.2, 5.0, 9.0]), curve)
    assert beyond.quantiles[0] == 0 and beyond.quantiles[-1] == 1 and beyond.below_range == beyond.above_range == 0.5
    assert invert(np.array([0.5, 3.5, truth(0.3)]), ratios, truth(ratios)) == pytest.approx([0.0, 1.0, 0.3])


def test_a_falling_curve_is_reported_and_inverted_through_its_monotone_fit():
    curve = Curve(np.linspace(0, 1, 5), np.array([[0.0, 1.0, 0.8, 1.5, 2.0]]))
    assert curve.decreasing_intervals() == [(0.25, 0.5)]
    assert np.all(np.diff(curve.monotone) >= 0) and curve.monotone.tolist() == pytest.approx([0, 0.9, 0.9, 1.5, 2.0])
    assert isotonic(np.array([3.0, 1.0, 2.0])).tolist() == pytest.approx([2.0, 2.0, 2.0])


def test_bad_references_get_evaluate_messages_before_any_model_loads(setup, tmp_path):
    recipe = setup[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvaluateError, match="neither an mdsd3 output"):
        calibrate(recipe, empty, tmp_path / "a.yaml")
    flat = tmp_path / "flat"
    (flat / "degraded").mkdir(parents=True)
    (flat / "clean").mkdir()
    Image.new("RGB", (32, 32)).save(flat / "clean" / "x.png")
    Image.new("RGB", (32, 32)).save(flat / "degraded" / "x.png")
    with pytest.raises(EvaluateError, match="--classes"):
        calibrate(recipe, flat, tmp_path / "a.yaml")
    mismatched = tmp_path / "mismatched"
    (mismatched / "degraded" / "haze").mkdir(parents=True)
    (mismatched / "clean").mkdir()
    Image.new("RGB", (32, 32)).save(mismatched / "clean" / "x.png")
    Image.new("RGB", (48, 32)).save(mismatched / "degraded" / "haze" / "x.png")
    with pytest.raises(EvaluateError, match="none of its 1 pairs could be read.*differs from its clean image"):
        calibrate(recipe, mismatched, tmp_path / "a.yaml", classes=["haze"])
    assert not list(tmp_path.glob("a*"))


def test_cli_reports_classes_left_as_given_and_refuses_to_overwrite(setup, tmp_path):
    recipe = setup[0]
    reference = write_reference(tmp_path / "reference", classes=("noise",))
    out = tmp_path / "result" / "left.yaml"
    result = calibrate_cli(recipe, reference, "rain,haze", out)
    assert result.exit_code == 1, result.output
    assert "absent" in result.output and "degraded/haze" in result.output
    assert yaml.safe_load(out.read_text())["variants"] == yaml.safe_load(recipe.read_text())["variants"]
    assert sorted(os.listdir(out.parent)) == ["left.report.json", "left.yaml"]
    again = calibrate_cli(recipe, reference, "haze", out)
    assert again.exit_code == 2 and "exists" in again.output
    unknown = calibrate_cli(recipe, reference, "hazy", tmp_path / "x.yaml")
    assert unknown.exit_code == 2 and "haze" in unknown.output


def calibrate_cli(recipe: Path, reference: Path, classes: str, out: Path) -> Result:
    """`mdsd3 calibrate` of `classes` against `reference`, written to `out`, on one worker."""
    return mdsd3(
        "calibrate", "--config", recipe, "--reference", reference, "--classes", classes, "--out", out, "--workers", "1"
    )


def _unchanged_reference(root: Path, count: int = 4) -> Path:
    """clean/ and degraded/haze/ holding the same photos: the reference shows no haze at all."""
    from mdsd3_cli.util.images import fit_image

    for folder in ("clean", "degraded/haze"):
        (root / folder).mkdir(parents=True)
    for index in range(count):
        pixels = fit_image(Image.open(EXAMPLE_PHOTOS / "chelsea.jpg"), 64 + 8 * index, "center_crop").pixels
        for folder in ("clean", "degraded/haze"):
            Image.fromarray(pixels).save(root / folder / f"chelsea_{index}.png")
    return root


def test_a_reference_without_the_class_calibrates_to_zero_and_is_still_checked(setup, synth, tmp_path):
    reference = _unchanged_reference(tmp_path / "reference")
    report = calibrate(
        setup[0],
        reference,
        tmp_path / "zero.yaml",
        classes=["haze"],
        probe=1,
        grid=4,
        check=4,
        workers=1,
        synthesizer=synth,
    )
    (haze,) = report.classes
    assert haze.status == "calibrated", haze.reason
    assert haze.quantiles == [0.0] * len(haze.quantiles)
    assert haze.before.strengths.count == haze.after.strengths.count == 4
    assert haze.after.wasserstein < haze.before.wasserstein


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_float_tiff_with_nan_or_inf_pixels_is_left_out_of_the_reference_and_named(tmp_path, bad):
    from mdsd3_cli.calibrate.reference import measure_reference

    reference = _unchanged_reference(tmp_path / "reference", count=3)
    luma = np.asarray(Image.open(reference / "clean" / "chelsea_0.png").convert("L"), np.float32) / 255
    Image.fromarray(luma).save(reference / "clean" / "gray.tif")
    hazy = 0.5 * luma + 0.5
    hazy[:4, :4] = bad  # a few undefined pixels: read as 0 they would shift the measured veil
    Image.fromarray(hazy).save(reference / "degraded" / "haze" / "gray.tif")
    found = measure_reference(reference, ["haze"], ["haze"], named=True, workers=1)
    assert found.strengths["haze"].tolist() == [0.0, 0.0, 0.0]
    (problem,) = found.problems
    assert problem.path.endswith("gray.tif") and "NaN or infinite" in problem.reason


def test_out_inside_the_recipes_input_folder_is_refused(setup):
    recipe = setup[0]
    photos = recipe.parent / "photos"
    before = sorted(os.listdir(photos))
    with pytest.raises(ValueError, match="inside the recipe's input folder"):
        calibrate(recipe, setup[1], photos / "calibrated.yaml", workers=1)
    assert sorted(os.listdir(photos)) == before  # its plot would have been the next run's input


def test_a_full_disk_writes_none_of_the_three_files_and_the_rerun_goes_on(setup, tmp_path, monkeypatch):
    from mdsd3_cli.util import atomic

    recipe = setup[0]
    reference = write_reference(tmp_path / "reference", classes=("noise",))
    out = tmp_path / "result" / "left.yaml"
    real_fdopen = os.fdopen

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(28, "No space left on device")

    def full_for_the_report(descriptor, mode="r", *arguments, **options):
        if os.readlink(f"/proc/self/fd/{descriptor}").endswith(".tmp") and ".report.json" in os.readlink(
            f"/proc/self/fd/{descriptor}"
        ):
            return io.BufferedWriter(FullDisk(descriptor, "wb"))
        return real_fdopen(descriptor, mode, *arguments, **options)

    monkeypatch.setattr(atomic.os, "fdopen", full_for_the_report)
    result = calibrate_cli(recipe, reference, "rain,haze", out)
    assert result.exit_code == 2 and "the disk is full" in result.output, result.output
    assert os.listdir(out.parent) == []  # before: left.yaml stayed, and the rerun below was refused
    monkeypatch.undo()
    again = calibrate_cli(recipe, reference, "rain,haze", out)
    assert again.exit_code == 1, again.output
    assert sorted(os.listdir(out.parent)) == ["left.report.json", "left.yaml"]
