"""Synthetic degradations (mdsd3_cli/model/presets/degradations.py) on real photos: identity at ratio 0, strength growing
with the ratio, seeded determinism, one class per sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdsd3_cli.model.presets.degradations import (
    CLASSES,
    DEGRADATIONS,
    RAIN_ANGLE_DEG,
    RAIN_DENSITY,
    RAIN_VEIL,
    RAIN_VEIL_COLOUR,
    degrade,
    quantize,
    rain,
)

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "photos"


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Two real photos at 64 px, [2, 3, 64, 64] in [0, 1]."""
    images = [
        np.asarray(Image.open(PHOTOS / f"{name}.jpg").convert("RGB").resize((64, 64))) for name in ("chelsea", "rocket")
    ]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def _apply(name: str, images: torch.Tensor, ratio: float, seed: int = 0) -> torch.Tensor:
    return DEGRADATIONS[name](images, ratio, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CLASSES)
def test_ratio_zero_is_the_clean_image_exactly(photos, name):
    assert torch.equal(_apply(name, photos, 0.0), photos)


@pytest.mark.parametrize("name", CLASSES)
def test_strength_grows_with_the_ratio(photos, name):
    change = [float((_apply(name, photos, r) - photos).abs().mean()) for r in (0.25, 0.5, 0.75, 1.0)]
    assert all(a < b for a, b in zip(change, change[1:])), change
    assert change[-1] > 0.03, change  # clearly visible at ratio 1 (mean change over 8/255)


@pytest.mark.parametrize("name", CLASSES)
def test_seeded_and_resampled(photos, name):
    first, again, other = _apply(name, photos, 0.7, 1), _apply(name, photos, 0.7, 1), _apply(name, photos, 0.7, 2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.min() >= 0 and first.max() <= 1


def test_physical_directions(photos):
    assert _apply("haze", photos, 1.0).std() < photos.std()  # haze lowers contrast ...
    assert _apply("haze", photos, 1.0).mean() > photos.mean()  # ... towards a light airlight
    assert _apply("low_light", photos, 1.0).mean() < 0.4 * photos.mean()  # dark ...
    assert _apply("low_light", photos, 1.0).mean() > 0.02  # ... but not black
    rained = _apply("rain", photos, 1.0)
    assert (rained >= photos - 0.01).all()  # streaks are bright; the veil only lifts (towards light grey)


def test_degrade_applies_one_class_per_sample(photos):
    batch = torch.cat([photos, photos])
    out = degrade(
        batch, CLASSES, torch.tensor([0, 1, 2, 3]), torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.Generator().manual_seed(0)
    )
    assert torch.equal(out[0], batch[0]) and torch.equal(out[3], batch[3])
    hazed = out[1]
    assert hazed.mean() > batch[1].mean()
    assert torch.equal(quantize(out), torch.round(out * 255) / 255)


def test_make_synthetic_pairs_writes_physical_pairs_at_full_and_half_strength(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_synthetic_pairs", PHOTOS.parents[1] / "scripts" / "make_synthetic_pairs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "pairs"
    assert module.make_physical_pairs(PHOTOS, out, ["haze", "noise"], size=32) == 6
    assert sorted(p.name for p in out.iterdir()) == ["clean", "haze", "haze_half", "noise", "noise_half"]
    first = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))}
    module.make_physical_pairs(PHOTOS, out, ["haze", "noise"], size=32)
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.png"))} == first  # seeded
    for name in ("haze", "noise"):
        clean, full, half = (
            np.asarray(Image.open(out / f / "rocket.png"), dtype=np.float64) for f in ("clean", name, f"{name}_half")
        )
        assert 0 < np.abs(half - clean).mean() < np.abs(full - clean).mean(), name
    with pytest.raises(ValueError, match="unknown classes"):
        module.make_physical_pairs(PHOTOS, out, ["snow"])


def _streaks(size: int, seed: int, field: torch.Tensor | None = None) -> torch.Tensor:
    """The rain layer alone on a flat dark grey image: rained minus the veiled background, [B, H, W]."""
    flat = torch.full((2, 3, size, size), 0.3)
    rained = rain(flat, 1.0, torch.Generator().manual_seed(seed), field)
    veiled = 0.3 + RAIN_VEIL * (RAIN_VEIL_COLOUR - 0.3)
    return (rained - veiled).mean(1)


def _orientation(layer: np.ndarray) -> tuple[float, float]:
    """(degrees from vertical of the lines, coherence 0-1) from the image-wide structure tensor."""
    gy, gx = np.gradient(layer)
    jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
    coherence = np.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy)
    gradient_angle = 0.5 * np.degrees(np.arctan2(2 * jxy, jxx - jyy))  # the gradients cross the lines
    return float(gradient_angle), float(coherence)


@pytest.mark.parametrize("size", (128, 256))
def test_rain_is_oriented_streaks_brighter_than_the_background(size):
    layer = _streaks(size, seed=4)
    assert (layer >= -1e-6).all()  # screen blend: never darker than the veiled background
    for image in layer.numpy():
        covered = image > 0.05
        assert 0.01 < covered.mean() < 0.2  # streaks, not a veil or a speckle of dots
        angle, coherence = _orientation(image)
        assert abs(angle - RAIN_ANGLE_DEG) <= 3 and coherence > 0.6, (angle, coherence)  # one direction: vertical
        rows = np.nonzero(covered.any(axis=1))[0]
        assert rows.max() - rows.min() > size // 2  # streaks over the whole frame
        assert image.max() > 0.3  # clearly brighter than what is behind


def test_rain_looks_the_same_at_128_and_256_px():
    """Drops per image area, lengths and widths scale with the height: the same coverage at both sizes."""
    coverage = {size: float((_streaks(size, seed=7) > 0.05).float().mean()) for size in (128, 256)}
    assert 0.7 < coverage[256] / coverage[128] < 1.4, coverage


def test_a_given_field_places_the_drops_and_the_noise():
    """The per-pixel randomness comes from `field` (mini couples it to the flow's start noise): a drop exactly where
    Φ(field[:, 0]) < density·r, the noise classes' n is the field itself, whatever the generator. Rain given a field
    draws nothing from the generator (its direction is fixed): the sampler can know all of it from ε."""
    size = 128
    field = torch.full((2, 3, size, size), 3.0)  # Φ(3) is far above the density: no drop
    field[:, 0, 40, 70] = -6.0  # one drop per image
    layer = _streaks(size, seed=0, field=field)
    assert layer[:, 40, 70].min() > 0.2  # a streak through the drop ...
    assert (layer > 0.05).float().mean() < 0.01  # ... and nothing else
    assert float(torch.special.ndtr(torch.tensor(-6.0))) < RAIN_DENSITY  # (the drop is below the threshold)
    assert torch.equal(layer, _streaks(size, seed=9, field=field))  # the direction is no draw either: fixed
    grey = torch.full((2, 3, 16, 16), 0.5)
    noise_field = torch.randn(grey.shape)
    for name in ("noise", "low_light"):
        first = DEGRADATIONS[name](grey, 1.0, torch.Generator().manual_seed(1), noise_field)
        assert torch.equal(first, DEGRADATIONS[name](grey, 1.0, torch.Generator().manual_seed(2), noise_field))
        assert not torch.equal(first, DEGRADATIONS[name](grey, 1.0, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="field of shape"):
        DEGRADATIONS["noise"](grey, 1.0, torch.Generator(), torch.randn(1, 3, 16, 16))
