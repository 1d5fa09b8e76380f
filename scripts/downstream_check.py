#!/usr/bin/env python3
"""Do mini's pairs train a better restorer than the classical degradations they were learnt from?

    python scripts/downstream_check.py --out out/downstream            # full settings (docs/downstream.md)
    python scripts/downstream_check.py --quick --out out/downstream_q  # pipeline check in seconds (tests)

Trains one small all-in-one restorer (NAFNet-style gated blocks in a 3-level U-Net, about 0.3 M parameters, L1
loss, random crops) per arm and seed on a pool of pairs made from crops of the photos mini was trained on
(COLOUR and GRAY in mdsd3_cli/model/presets/mini_photos.py):

* A, classical: mdsd3_cli/model/presets/degradations.py at each pair's class and ratio;
* B, mini: `Synthesizer.from_preset("mini")` at the same classes, ratios and crops;
* C, classical at mini's strengths: A's degradations with each class's ratio scaled by k = (mini's strength) /
  (classical strength), both measured on the pool with `mdsd3 evaluate`'s estimators.

Every arm sees the same clean crops, the same class and ratio per crop and, for one seed, the same training crops
in the same order. Tests on photos that neither mini nor the restorers saw (chelsea and coffee, held out of mini,
and scikit-image's clock), tiled, degraded by generators neither arm saw: albumentations RandomRain, RandomFog and
ISONoise, kornia RandomRain and an unprocess-style low-light pipeline (sRGB to linear, inverse white balance,
exposure cut, shot and read noise, back), each at 3 strengths. Reports, per class and generator, each arm's
ΔPSNR and ΔSSIM (restored minus degraded input) and the paired differences between arms with paired bootstrap 95%
intervals over test items (tile × strength, seeds averaged), and identity fidelity (the restorer on clean
tiles). Writes OUT/results.json and OUT/table.md; prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdsd3_cli.evaluate import estimators  # noqa: E402
from mdsd3_cli.evaluate.measures import CLASS_ESTIMATORS  # noqa: E402
from mdsd3_cli.model.presets import degradations  # noqa: E402

ARMS = ("A", "B", "C")
ARM_NAMES = {"A": "classical", "B": "mini", "C": "classical at mini's strengths"}
CLASSES = degradations.CLASSES
IDENTITY_FRACTION = 0.1
RATIO_RANGE = (0.25, 1.0)
EXTRA_TEST_PHOTOS = ("clock",)
"""scikit-image photos outside mini's training list, tested beside its held-out photos."""
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Settings:
    pool: int = 320
    """Pairs per arm (one class at one ratio per crop; 10% identity pairs)."""
    pool_side: int = 128
    """Side of the pool's crops: mini's resolution."""
    crop: int = 64
    steps: int = 3000
    batch: int = 16
    lr: float = 1e-3
    seeds: int = 2
    tile: int = 128
    tiles_per_photo: int = 0
    """0: every whole tile of each test photo."""
    width: int = 16


QUICK = Settings(pool=8, pool_side=64, crop=16, steps=20, batch=2, seeds=1, tile=64, tiles_per_photo=1)


# ------------------------------------------------------------------------------------------------ restorer


class ChannelNorm(nn.Module):
    """Layer normalisation over the channels of each pixel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-6) * self.weight + self.bias


class GatedBlock(nn.Module):
    """A spatial-mixing half (expand, depthwise 3x3, gate by halves, channel attention) and a gated
    feed-forward half, each added back through a zero-initialised per-channel scale."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm_mix, self.norm_ffn = ChannelNorm(width), ChannelNorm(width)
        self.expand = nn.Conv2d(width, 2 * width, 1)
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, width, 1))
        self.project = nn.Conv2d(width, width, 1)
        self.ffn_in = nn.Conv2d(width, 2 * width, 1)
        self.ffn_out = nn.Conv2d(width, width, 1)
        self.mix_scale = nn.Parameter(torch.zeros(1, width, 1, 1))
        self.ffn_scale = nn.Parameter(torch.zeros(1, width, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.depthwise(self.expand(self.norm_mix(x))).chunk(2, dim=1)
        gated = first * second
        x = x + self.project(gated * self.attention(gated)) * self.mix_scale
        first, second = self.ffn_in(self.norm_ffn(x)).chunk(2, dim=1)
        return x + self.ffn_out(first * second) * self.ffn_scale


class Restorer(nn.Module):
    """A 3-level U-Net of gated blocks predicting the residual clean − degraded (sides divisible by 8)."""

    def __init__(self, width: int = 16, levels: int = 3) -> None:
        super().__init__()
        widths = [width * 2**level for level in range(levels + 1)]
        self.intro = nn.Conv2d(3, width, 3, padding=1)
        self.encoders = nn.ModuleList(GatedBlock(w) for w in widths[:-1])
        self.downs = nn.ModuleList(nn.Conv2d(w, 2 * w, 2, stride=2) for w in widths[:-1])
        self.middle = GatedBlock(widths[-1])
        self.ups = nn.ModuleList(nn.Sequential(nn.Conv2d(2 * w, 4 * w, 1), nn.PixelShuffle(2)) for w in widths[:-1])
        self.decoders = nn.ModuleList(GatedBlock(w) for w in widths[:-1])
        self.outro = nn.Conv2d(width, 3, 3, padding=1)
        nn.init.zeros_(self.outro.weight)  # starts as the identity
        nn.init.zeros_(self.outro.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.intro(image)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle(x)
        for up, decoder, skip in zip(reversed(self.ups), reversed(self.decoders), reversed(skips)):
            x = decoder(up(x) + skip)
        return image + self.outro(x)


def train_restorer(clean: torch.Tensor, degraded: torch.Tensor, settings: Settings, seed: int) -> Restorer:
    """L1 training on random crops (with flips) of uint8 pairs [N, 3, S, S]; AdamW, cosine decay. One seed gives
    the same weights' start and the same crops in the same order whatever the pairs are."""
    torch.manual_seed(seed)
    model = Restorer(settings.width)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.9), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.steps, eta_min=settings.lr / 100)
    generator = torch.Generator().manual_seed(seed)
    count, side, crop = clean.shape[0], clean.shape[-1], settings.crop
    model.train()
    for _ in range(settings.steps):
        rows = torch.randint(count, (settings.batch,), generator=generator)
        corners = torch.randint(side - crop + 1, (settings.batch, 2), generator=generator)
        flips = torch.randint(2, (settings.batch, 2), generator=generator)
        inputs, targets = [], []
        for row, (top, left), (vertical, horizontal) in zip(rows.tolist(), corners.tolist(), flips.tolist()):
            dims = [dim for dim, flip in ((1, vertical), (2, horizontal)) if flip]
            for source, out in ((degraded, inputs), (clean, targets)):
                patch = source[row, :, top : top + crop, left : left + crop]
                out.append(patch.flip(dims) if dims else patch)
        x, y = torch.stack(inputs).float() / 255, torch.stack(targets).float() / 255
        loss = F.l1_loss(model(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def restore(model: Restorer, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] in, uint8 out (as a saved restored image holds)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    out = torch.cat([model(chunk) for chunk in x.split(8)])
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------------ photos


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (255 * (image.astype(np.float64) / max(float(image.max()), 1e-9))).round().astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def load_photo(name: str) -> np.ndarray:
    """examples/photos/<name>.jpg where shipped, else scikit-image's photo (as train_mini.py loads them)."""
    from PIL import Image
    from skimage import data

    path = ROOT / "examples" / "photos" / f"{name}.jpg"
    if path.is_file():
        return np.asarray(Image.open(path).convert("RGB"))
    return _rgb(data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)())


def photo_sets() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(training photos, test photos): mini's training photos; its held-out photos and EXTRA_TEST_PHOTOS."""
    from mdsd3_cli.model.presets.mini_photos import COLOUR, GRAY, HELD_OUT

    trained = (*COLOUR, *GRAY)
    overlap = set(EXTRA_TEST_PHOTOS) & set(trained)
    if overlap:
        raise SystemExit(
            f"test photos {sorted(overlap)} are in mini's training list (mdsd3_cli/model/presets/mini_photos.py)"
        )
    return (
        {name: load_photo(name) for name in trained},
        {name: load_photo(name) for name in (*HELD_OUT, *EXTRA_TEST_PHOTOS)},
    )


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC, reducing_gap=3.0))


def held_out_tiles(photos: dict[str, np.ndarray], tile: int, per_photo: int) -> tuple[np.ndarray, list[str]]:
    """Whole `tile`-pixel tiles of each photo (row-major; the first `per_photo` when it is not 0) and their names."""
    tiles, names = [], []
    for name, photo in photos.items():
        rows, columns = photo.shape[0] // tile, photo.shape[1] // tile
        cells = [(row, column) for row in range(rows) for column in range(columns)]
        for row, column in cells[: per_photo or None]:
            tiles.append(photo[row * tile : (row + 1) * tile, column * tile : (column + 1) * tile])
            names.append(f"{name}_{row}_{column}")
    return np.stack(tiles), names


# ------------------------------------------------------------------------------------------------ training pairs


@dataclass
class Pool:
    clean: np.ndarray
    """uint8 [N, S, S, 3]."""
    classes: list[str | None]
    """Each pair's class (None: an identity pair)."""
    ratios: np.ndarray


def draw_pool(photos: dict[str, np.ndarray], settings: Settings, seed: int = 0) -> Pool:
    """Random crops at random scales of the training photos (as train_mini.py draws its crops), one class at a
    ratio in RATIO_RANGE per crop, classes in turn (IDENTITY_FRACTION identity pairs)."""
    rng = np.random.default_rng(seed)
    names = list(photos)
    crops, classes = [], []
    for index in range(settings.pool):
        image = photos[names[rng.integers(len(names))]]
        short = min(image.shape[:2])
        side = int(round(short * math.exp(rng.uniform(math.log(0.3), 0.0))))
        top, left = rng.integers(0, image.shape[0] - side + 1), rng.integers(0, image.shape[1] - side + 1)
        crops.append(_resize(image[top : top + side, left : left + side], settings.pool_side))
        identity = rng.uniform() < IDENTITY_FRACTION
        classes.append(None if identity else CLASSES[index % len(CLASSES)])
    ratios = rng.uniform(*RATIO_RANGE, size=settings.pool)
    return Pool(np.stack(crops), classes, ratios)


def classical_pairs(pool: Pool, scales: dict[str, float] | None = None) -> np.ndarray:
    """The pool degraded by degradations.py (each ratio times its class's scale, at most 1: the classical
    degradations stop at ratio 1; pair i uses generator seed i)."""
    out = []
    for index, (clean, name, ratio) in enumerate(zip(pool.clean, pool.classes, pool.ratios)):
        if name is None:
            out.append(clean)
            continue
        ratio = min(1.0, float(ratio) * (scales or {}).get(name, 1.0))
        out.append(degradations.degrade_photo(clean, name, ratio, torch.Generator().manual_seed(index)))
    return np.stack(out)


def mini_pairs(pool: Pool, log: Callable[[str], None]) -> np.ndarray:
    """The pool degraded by mini at the demo's settings (pool_side pixels), sample i with seed i."""
    from mdsd3_cli import Synthesizer

    side = pool.clean.shape[1]
    synth = Synthesizer.from_preset("mini", overrides=[f"input.size={side}"])
    out, chunk = [], 16
    for start in range(0, len(pool.clean), chunk):
        stop = min(start + chunk, len(pool.clean))
        classes = [
            {} if name is None else {name: float(ratio)}
            for name, ratio in zip(pool.classes[start:stop], pool.ratios[start:stop])
        ]
        pairs = synth.degrade(list(pool.clean[start:stop]), classes=classes, seed=list(range(start, stop)))
        out.extend(pair.degraded for pair in pairs)
        log(f"mini pairs {stop}/{len(pool.clean)}")
    return np.stack(out)


def strength_scales(pool: Pool, classical: np.ndarray, mini: np.ndarray) -> dict[str, dict[str, float]]:
    """Per class: the summed strength of mini's and the classical pairs (evaluate's estimator of that class) and
    their quotient `scale`, by which C multiplies A's ratios."""
    result = {}
    for name in CLASSES:
        rows = [index for index, cls in enumerate(pool.classes) if cls == name]
        measure = CLASS_ESTIMATORS[name]
        classical_sum = sum(measure(estimators.Pair(pool.clean[i], classical[i])) for i in rows)
        mini_sum = sum(measure(estimators.Pair(pool.clean[i], mini[i])) for i in rows)
        scale = mini_sum / classical_sum if classical_sum > 0 else 1.0
        result[name] = {
            "classical_mean": classical_sum / max(len(rows), 1),
            "mini_mean": mini_sum / max(len(rows), 1),
            "scale": max(float(scale), 0.0),
        }
    return result


# ------------------------------------------------------------------------------------------------ test generators


@dataclass(frozen=True)
class UnseenGenerator:
    name: str
    cls: str
    strengths: tuple[float, float, float]
    apply: Callable[[np.ndarray, float, int], np.ndarray]
    """(uint8 [H, W, 3], strength, seed) -> uint8 [H, W, 3]."""


def _albumentations(transform: Callable[[float, int], Any]) -> Callable[[np.ndarray, float, int], np.ndarray]:
    import albumentations

    def apply(image: np.ndarray, strength: float, seed: int) -> np.ndarray:
        compose = albumentations.Compose([transform(strength, image.shape[0])], seed=seed)
        return np.ascontiguousarray(compose(image=image)["image"])

    return apply


def _kornia_rain(image: np.ndarray, strength: float, seed: int) -> np.ndarray:
    from kornia.augmentation import RandomRain

    height = image.shape[0]
    drops = max(1, int(strength * image.shape[0] * image.shape[1] / 128**2))
    length = max(2, height // 12)
    rain = RandomRain(number_of_drops=(drops, drops), drop_height=(length, 2 * length), drop_width=(-2, 2), p=1.0)
    torch.manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255
    out = rain(x)[0].clamp(0, 1)
    return (out * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1 / 2.4) - 0.055)


def unprocess_low_light(image: np.ndarray, stops: float, seed: int) -> np.ndarray:
    """An under-exposed camera capture: sRGB to linear, divide by white-balance gains (to raw-like values), cut the
    exposure by `stops`, add shot and read noise (variance a·x + b², with b² growing with a as measured sensors
    do), then white balance and sRGB again."""
    rng = np.random.default_rng(seed)
    linear = _srgb_to_linear(image.astype(np.float64) / 255)
    gains = np.array([rng.uniform(1.9, 2.4), 1.0, rng.uniform(1.5, 1.9)])
    raw = linear / gains * 2.0**-stops
    shot = 0.0015 * stops
    read_variance = math.exp(2.18 * math.log(shot) + 1.2)
    noisy = raw + np.sqrt(shot * raw + read_variance) * rng.standard_normal(raw.shape)
    return (_linear_to_srgb(noisy * gains) * 255).round().astype(np.uint8)


def unseen_generators() -> tuple[list[UnseenGenerator], list[str]]:
    """The generators that import here and, for each that does not, why it is skipped."""
    generators, skipped = [], []
    try:
        import albumentations as alb

        generators += [
            UnseenGenerator(
                "albumentations.RandomRain",
                "rain",
                (0.5, 1.0, 2.0),
                _albumentations(
                    lambda s, h: (
                        alb.RandomRain(
                            slant_range=(-15, 15),
                            drop_length=max(2, h // 10),
                            drop_width=1,
                            blur_value=3,
                            brightness_coefficient=1 - 0.1 * s,
                            rain_type="default",
                            p=1.0,
                        )
                        if s < 1.5
                        else alb.RandomRain(
                            slant_range=(-15, 15),
                            drop_length=max(2, h // 8),
                            drop_width=1,
                            blur_value=3,
                            brightness_coefficient=0.8,
                            rain_type="torrential",
                            p=1.0,
                        )
                    )
                ),
            ),
            UnseenGenerator(
                "albumentations.RandomFog",
                "haze",
                (0.3, 0.5, 0.8),
                _albumentations(lambda s, h: alb.RandomFog(fog_coef_range=(s, s), alpha_coef=0.08, p=1.0)),
            ),
            UnseenGenerator(
                "albumentations.ISONoise",
                "noise",
                (0.2, 0.5, 0.8),
                _albumentations(lambda s, h: alb.ISONoise(color_shift=(0.02, 0.02), intensity=(s, s), p=1.0)),
            ),
        ]
    except ImportError as error:
        skipped.append(f"albumentations generators skipped: {error} (pip install albumentations)")
    try:
        import kornia.augmentation  # noqa: F401

        generators.append(UnseenGenerator("kornia.RandomRain", "rain", (150.0, 300.0, 600.0), _kornia_rain))
    except ImportError as error:
        skipped.append(f"kornia.RandomRain skipped: {error} (pip install kornia)")
    generators.append(UnseenGenerator("unprocess low light", "low_light", (1.0, 2.0, 3.0), unprocess_low_light))
    return generators, skipped


# ------------------------------------------------------------------------------------------------ measuring


def quality(clean: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PSNR and SSIM (evaluate's estimators) of each image against its clean tile."""
    pairs = [estimators.Pair(c, i) for c, i in zip(clean, images)]
    return np.array([estimators.psnr(p) for p in pairs]), np.array([estimators.ssim(p) for p in pairs])


def bootstrap(values: np.ndarray, rng: np.random.Generator) -> list[float]:
    """[mean, low, high]: the mean and its paired bootstrap 95% interval (values are per-item differences)."""
    values = np.asarray(values, dtype=np.float64)
    means = values[rng.integers(0, len(values), (BOOTSTRAP_RESAMPLES, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return [float(values.mean()), float(low), float(high)]


def run(settings: Settings, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.monotonic()
    train_photos, test_photos = photo_sets()
    pool = draw_pool(train_photos, settings)
    arms_pairs = {"A": classical_pairs(pool)}
    arms_pairs["B"] = mini_pairs(pool, log)
    scales = strength_scales(pool, arms_pairs["A"], arms_pairs["B"])
    arms_pairs["C"] = classical_pairs(pool, {name: value["scale"] for name, value in scales.items()})
    log("scales (mini / classical strength): " + ", ".join(f"{n} {v['scale']:.2f}" for n, v in scales.items()))
    pairs_seconds = time.monotonic() - started

    clean_pool = torch.from_numpy(pool.clean).permute(0, 3, 1, 2).contiguous()
    models: dict[str, list[Restorer]] = {arm: [] for arm in ARMS}
    for seed in range(settings.seeds):
        for arm in ARMS:
            tick = time.monotonic()
            degraded = torch.from_numpy(arms_pairs[arm]).permute(0, 3, 1, 2).contiguous()
            models[arm].append(train_restorer(clean_pool, degraded, settings, seed))
            log(f"trained {arm} seed {seed} in {time.monotonic() - tick:.0f} s")
    train_seconds = time.monotonic() - started - pairs_seconds

    tiles, tile_names = held_out_tiles(test_photos, settings.tile, settings.tiles_per_photo)
    generators, skipped = unseen_generators()
    for line in skipped:
        log(line)
    rng = np.random.default_rng(0)
    rows, per_strength = [], []
    for generator in generators:
        items: dict[str, Any] = {
            "input_psnr": [],
            "input_ssim": [],
            **{f"{arm}_{m}": [] for arm in ARMS for m in ("dpsnr", "dssim")},
        }
        for level, strength in enumerate(generator.strengths):
            degraded = np.stack(
                [generator.apply(tile, strength, 1000 * level + index) for index, tile in enumerate(tiles)]
            )
            psnr_in, ssim_in = quality(tiles, degraded)
            items["input_psnr"].append(psnr_in)
            items["input_ssim"].append(ssim_in)
            level_row = {
                "generator": generator.name,
                "class": generator.cls,
                "strength": strength,
                "input_psnr": float(psnr_in.mean()),
            }
            for arm in ARMS:
                gains = [quality(tiles, restore(model, degraded)) for model in models[arm]]
                dpsnr = np.mean([g[0] for g in gains], axis=0) - psnr_in
                dssim = np.mean([g[1] for g in gains], axis=0) - ssim_in
                items[f"{arm}_dpsnr"].append(dpsnr)
                items[f"{arm}_dssim"].append(dssim)
                level_row[f"{arm}_dpsnr"] = float(dpsnr.mean())
            per_strength.append(level_row)
        flat = {key: np.concatenate(value) for key, value in items.items()}
        row = {
            "generator": generator.name,
            "class": generator.cls,
            "strengths": list(generator.strengths),
            "items": int(len(flat["input_psnr"])),
            "input_psnr": float(flat["input_psnr"].mean()),
            "input_ssim": float(flat["input_ssim"].mean()),
            "arms": {},
            "differences": {},
        }
        for arm in ARMS:
            row["arms"][arm] = {m: bootstrap(flat[f"{arm}_{m}"], rng) for m in ("dpsnr", "dssim")}
        for first, second in (("B", "A"), ("B", "C"), ("C", "A")):
            row["differences"][f"{first}-{second}"] = {
                m: bootstrap(flat[f"{first}_{m}"] - flat[f"{second}_{m}"], rng) for m in ("dpsnr", "dssim")
            }
        rows.append(row)
        log(f"tested {generator.name}")

    identity = {}
    for arm in ARMS:
        results = [quality(tiles, restore(model, tiles)) for model in models[arm]]
        identity[arm] = {
            "psnr": bootstrap(np.mean([r[0] for r in results], axis=0), rng),
            "ssim": bootstrap(np.mean([r[1] for r in results], axis=0), rng),
        }
    parameters = sum(p.numel() for p in models["A"][0].parameters())
    report = {
        "settings": asdict(settings),
        "restorer_parameters": parameters,
        "scales": scales,
        "pool_classes": {str(name): pool.classes.count(name) for name in (*CLASSES, None)},
        "test_photos": list(test_photos),
        "test_tiles": len(tile_names),
        "skipped": skipped,
        "rows": rows,
        "per_strength": per_strength,
        "identity": identity,
        "seconds": {
            "pairs": round(pairs_seconds, 1),
            "training": round(train_seconds, 1),
            "total": round(time.monotonic() - started, 1),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(markdown(report))
    return report


def _ci(values: Sequence[float], digits: int, sign: str = "+") -> str:
    mean, low, high = values
    return f"{mean:{sign}.{digits}f} [{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"


def markdown(report: dict[str, Any]) -> str:
    """The report's tables: ΔPSNR and ΔSSIM per class and generator (each arm, then arm differences), the
    identity fidelity and ΔPSNR per strength."""
    lines = []
    for metric, label, digits in (("dpsnr", "ΔPSNR (dB)", 2), ("dssim", "ΔSSIM", 3)):
        lines += [
            f"{label}, restored − degraded input, mean [paired bootstrap 95% CI]:",
            "",
            "| class | generator | input | A classical | B mini | C classical at mini's strengths | B − A | B − C |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in report["rows"]:
            source = row["input_psnr"] if metric == "dpsnr" else row["input_ssim"]
            cells = [_ci(row["arms"][arm][metric], digits) for arm in ARMS]
            cells += [_ci(row["differences"][key][metric], digits) for key in ("B-A", "B-C")]
            lines.append(f"| {row['class']} | {row['generator']} | {source:.{digits}f} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Identity fidelity (restorer on clean tiles), mean [95% CI]:",
        "",
        "| arm | PSNR (dB) | SSIM |",
        "| --- | --- | --- |",
    ]
    for arm in ARMS:
        values = report["identity"][arm]
        lines.append(f"| {arm} {ARM_NAMES[arm]} | {_ci(values['psnr'], 2, '')} | {_ci(values['ssim'], 4, '')} |")
    lines += [
        "",
        "ΔPSNR (dB) per strength (mean over tiles and seeds):",
        "",
        "| generator | strength | input PSNR | A | B | C |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["per_strength"]:
        lines.append(
            f"| {row['generator']} | {row['strength']:g} | {row['input_psnr']:.2f} | "
            + " | ".join(f"{row[f'{arm}_dpsnr']:+.2f}" for arm in ARMS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "downstream")
    parser.add_argument("--quick", action="store_true", help="tiny pool, crops and step count, 1 seed (seconds)")
    parser.add_argument("--steps", type=int, help="training steps per restorer (default 3000)")
    parser.add_argument("--seeds", type=int, help="restorers per arm (default 2)")
    parser.add_argument("--pool", type=int, help="pairs per arm (default 320)")
    parser.add_argument("--batch", type=int, help="crops per step (default 16)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: no spinning threads on a busy machine)"
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    overrides = {
        key: value
        for key, value in (("steps", args.steps), ("seeds", args.seeds), ("pool", args.pool), ("batch", args.batch))
        if value is not None
    }
    settings = Settings(**{**asdict(settings), **overrides})
    torch.set_num_threads(args.threads)
    report = run(settings, args.out, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(markdown(report))
    print(f"{report['seconds']['total']:.0f} s; {args.out / 'results.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
