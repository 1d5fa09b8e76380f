"""`mdsd3 evaluate`'s seam measure: steps across a token grid's lines over steps elsewhere, relative to the clean
image's. A per-block offset (a token mosaic) reads clearly above 1; smooth degradations read about 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from mdsd3_cli.evaluate import classical, measure_pair
from mdsd3_cli.evaluate.estimators import Pair, seam_ratio

from .helpers import mdsd3

SIZE, GRID = 128, 8


def photo(name: str) -> np.ndarray:
    """A scikit-image photo, centre-cropped square and resized to SIZE, uint8 RGB."""
    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.BICUBIC))


def blocky(pixels: np.ndarray, grid: int = GRID, spread: float = 8.0, seed: int = 0) -> np.ndarray:
    """Each grid x grid block shifted by its own constant (per channel): a token mosaic."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0.0, spread, (pixels.shape[0] // grid, pixels.shape[1] // grid, 3))
    shifted = pixels.astype(np.float64) + np.repeat(np.repeat(offsets, grid, axis=0), grid, axis=1)
    return np.clip(np.round(shifted), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", ("astronaut", "chelsea", "coffee"))
def test_a_token_mosaic_reads_above_1_and_smooth_degradations_about_1(name: str) -> None:
    clean = photo(name)
    assert seam_ratio(Pair(clean, clean.copy()), GRID) == 1.0
    assert seam_ratio(Pair(clean, blocky(clean)), GRID) > 1.1
    # Seen: blur 0.93-1.04 (which edges a blur keeps varies a little with the photo), noise and haze 0.99-1.00.
    assert seam_ratio(Pair(clean, classical.gaussian_blur(clean, 1.0)), GRID) == pytest.approx(1.0, abs=0.1)
    for degraded in (classical.gaussian_noise(clean, 10, seed=1), classical.haze(clean, 0.5)):
        assert seam_ratio(Pair(clean, degraded), GRID) == pytest.approx(1.0, abs=0.03)
    # A mosaic on another grid is not this grid's seam (its lines fall on every other 8-pixel line only).
    assert seam_ratio(Pair(clean, blocky(clean, grid=GRID)), 3) < 1.1


def test_measure_pair_reports_the_seam_ratio_on_the_grid_it_is_given() -> None:
    clean = photo("chelsea")
    mosaic = blocky(clean, grid=16)
    assert measure_pair(clean, mosaic, seam_grid=16)["seam"] > measure_pair(clean, mosaic)["seam"] > 1.1


def test_evaluate_reports_the_seam_median_per_variant(tmp_path: Path) -> None:
    (tmp_path / "clean").mkdir()
    (tmp_path / "degraded").mkdir()
    for name in ("astronaut", "coffee"):
        clean = photo(name)
        Image.fromarray(clean).save(tmp_path / "clean" / f"{name}.png")
        Image.fromarray(blocky(clean, grid=16)).save(tmp_path / "degraded" / f"{name}.png")
    out = tmp_path / "report"
    result = mdsd3(
        "evaluate",
        "--pairs",
        str(tmp_path / "clean"),
        str(tmp_path / "degraded"),
        "--out",
        str(out),
        "--workers",
        "1",
        "--seam-grid",
        "16",
    )
    assert result.exit_code == 0, result.output
    assert "seam" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["seam_grid"] == 16 and report["estimators"]["seam"]
    (variant,) = report["dataset"]["variants"].values()
    assert variant["measures"]["seam"]["median"] > 1.1
    assert "seam" in (out / "samples.csv").read_text().splitlines()[0].split(",")
    refused = mdsd3("evaluate", "--pairs", str(tmp_path / "clean"), str(tmp_path / "degraded"), "--seam-grid", "1")
    assert refused.exit_code == 2


def no_step_across_the_grid(size: int = 64) -> np.ndarray:
    """Vertical stripes that change only inside each GRID-pixel cell: every step across a grid line is 0, so the
    clean image's own grid step ratio is 0."""
    columns = np.array([0, 200, 0, 200, 0, 200, 0, 0], dtype=np.uint8)[np.arange(size) % GRID]
    return np.repeat(np.repeat(columns[None, :, None], size, axis=0), 3, axis=2)


def test_a_clean_image_without_steps_across_the_grid_gives_nan_not_a_lost_run(tmp_path: Path) -> None:
    clean = no_step_across_the_grid()
    assert np.isnan(seam_ratio(Pair(clean, classical.gaussian_noise(clean, 10, seed=0)), GRID))
    for folder in ("clean", "degraded"):
        (tmp_path / folder).mkdir()
    Image.fromarray(clean).save(tmp_path / "clean" / "stripes.png")
    Image.fromarray(classical.gaussian_noise(clean, 10, seed=0)).save(tmp_path / "degraded" / "stripes.png")
    coffee = photo("coffee")
    Image.fromarray(coffee).save(tmp_path / "clean" / "coffee.png")
    Image.fromarray(blocky(coffee)).save(tmp_path / "degraded" / "coffee.png")
    out = tmp_path / "report"
    result = mdsd3(
        "evaluate",
        "--pairs",
        str(tmp_path / "clean"),
        str(tmp_path / "degraded"),
        "--out",
        str(out),
        "--workers",
        "1",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["samples"] == 2
    (variant,) = report["dataset"]["variants"].values()
    assert variant["measures"]["seam"]["count"] == 1 and variant["measures"]["seam"]["median"] > 1.1
    assert variant["measures"]["noise"]["count"] == 2
