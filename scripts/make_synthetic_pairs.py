#!/usr/bin/env python3
"""Synthetic clean/degraded training pairs from clean photos, for smoke runs of `mdsd3 train`.

    python scripts/make_synthetic_pairs.py --photos examples/photos --out out/synthetic_pairs --size 64

writes OUT/clean/<name>.png, OUT/haze/<name>.png, OUT/noise/<name>.png and the half-strength versions
OUT/haze_half/<name>.png, OUT/noise_half/<name>.png (same basenames, so each degraded folder pairs with clean/
as a `paired_folders` dataset; label the half folders with ratio 0.5 to teach what a ratio of 0.5 means):

* haze  = blend toward white:  x' = (1 - h) * x + h * 255           (--haze h, default 0.5; half: h / 2)
* noise = additive Gaussian:   x' = clip(x + N(0, s^2)), s in 0-255 (--noise-sigma s, default 25; half: s / 2),
          one fixed noise field per photo (seeded by --seed and the file name; the half version scales it)

With `--classes` (any of rain, haze, noise, low_light) the pairs come instead from the physically motivated
degradations of mdsd3_cli/model/presets/degradations.py (haze by atmospheric scattering with a depth proxy, a rain streak
layer, Poisson-Gaussian noise, low light with its noise; that module documents each parameter and how a ratio
maps to it): OUT/C/ at --ratio (default 1) and OUT/C_half/ at half of it, for each class C, one class per
pair, never mixed; the half version draws the same random parameters, so it differs only in strength.

    python scripts/make_synthetic_pairs.py --photos examples/photos --out out/physical_pairs --size 128 \
        --classes rain haze noise low_light

`--size N` first scales each photo so its short side is N (do this at the training resolution: noise added at
a larger size and then downscaled by the data loader would be averaged away). PNG only: JPEG would smear the
noise. The classical filters are what the learning test of `mdsd3 train` is calibrated on; either kind is a
stand-in: real training data should be real degradations.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FOLDERS = ("clean", "haze", "noise", "haze_half", "noise_half")
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def haze(pixels: np.ndarray, amount: float) -> np.ndarray:
    """Blend toward white: uint8 [H, W, 3] -> uint8."""
    return np.clip((1.0 - amount) * pixels.astype(np.float64) + amount * 255.0 + 0.5, 0, 255).astype(np.uint8)


def gaussian_noise(pixels: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Additive Gaussian noise with standard deviation `sigma` (0-255 scale): uint8 [H, W, 3] -> uint8."""
    noise = np.random.default_rng(seed).normal(0.0, sigma, pixels.shape)
    return np.clip(pixels.astype(np.float64) + noise + 0.5, 0, 255).astype(np.uint8)


def _name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def _load(path: Path, size: int | None) -> Image.Image:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    if size:
        scale = size / min(image.size)
        image = image.resize(
            (max(size, round(image.width * scale)), max(size, round(image.height * scale))),
            Image.Resampling.BICUBIC,
            reducing_gap=3.0,
        )
    return image


def _photo_paths(photos: Path) -> list[Path]:
    paths = sorted(
        p for p in Path(photos).iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and not p.name.startswith(".")
    )
    if not paths:
        raise FileNotFoundError(f"no photos ({', '.join(sorted(PHOTO_SUFFIXES))}) in {photos}")
    return paths


def _write(out: Path, name: str, outputs: dict[str, np.ndarray]) -> None:
    """OUT/<folder>/<name>.png for each output, each written to a temp name and renamed."""
    for folder, array in outputs.items():
        target = Path(out) / folder / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        Image.fromarray(array).save(tmp, format="PNG")
        tmp.replace(target)


def make_pairs(
    photos: Path, out: Path, size: int | None = None, haze_amount: float = 0.5, noise_sigma: float = 25.0, seed: int = 0
) -> int:
    """Write clean/, haze/, noise/, haze_half/ and noise_half/ under `out` for every photo in `photos`;
    returns the number of photos."""
    paths = _photo_paths(photos)
    for path in paths:
        pixels = np.asarray(_load(path, size))
        noise_seed = _name_seed(seed, path.stem)
        _write(
            out,
            path.stem,
            {
                "clean": pixels,
                "haze": haze(pixels, haze_amount),
                "noise": gaussian_noise(pixels, noise_sigma, noise_seed),
                "haze_half": haze(pixels, haze_amount / 2),
                "noise_half": gaussian_noise(pixels, noise_sigma / 2, noise_seed),
            },
        )
    return len(paths)


def make_physical_pairs(
    photos: Path, out: Path, classes: Sequence[str], size: int | None = None, ratio: float = 1.0, seed: int = 0
) -> int:
    """Write clean/ and, per class C, C/ (at `ratio`) and C_half/ (at `ratio / 2`) with mdsd3_cli.model.presets.degradations
    under `out` for every photo in `photos`; returns the number of photos."""
    import torch

    from mdsd3_cli.model.presets.degradations import DEGRADATIONS, degrade_photo

    unknown = sorted(set(classes) - set(DEGRADATIONS))
    if unknown:
        raise ValueError(f"unknown classes {unknown}; choose from {sorted(DEGRADATIONS)}")
    paths = _photo_paths(photos)
    for path in paths:
        pixels = np.asarray(_load(path, size))
        outputs = {"clean": pixels}
        for name in classes:
            for folder, strength in ((name, ratio), (f"{name}_half", ratio / 2)):
                generator = torch.Generator().manual_seed(_name_seed(seed, f"{name}:{path.stem}") >> 1)
                outputs[folder] = degrade_photo(pixels, name, strength, generator)
        _write(out, path.stem, outputs)
    return len(paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, required=True, help="folder of clean photos")
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (gets " + ", ".join(f"{f}/" for f in FOLDERS) + ")"
    )
    parser.add_argument("--size", type=int, default=None, help="scale each photo's short side to this first")
    parser.add_argument("--haze", type=float, default=0.5, help="blend-toward-white amount in [0, 1]")
    parser.add_argument("--noise-sigma", type=float, default=25.0, help="Gaussian noise std on the 0-255 scale")
    parser.add_argument(
        "--classes",
        nargs="+",
        default=None,
        metavar="CLASS",
        help="physical degradations instead (rain, haze, noise, low_light: mdsd3_cli/model/presets/degradations.py)",
    )
    parser.add_argument("--ratio", type=float, default=1.0, help="with --classes: the full-strength ratio in [0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0.0 <= args.haze <= 1.0:
        parser.error("--haze must lie in [0, 1]")
    if not 0.0 <= args.ratio <= 1.0:
        parser.error("--ratio must lie in [0, 1]")
    try:
        if args.classes:
            count = make_physical_pairs(args.photos, args.out, args.classes, args.size, args.ratio, args.seed)
            folders = ["clean", *(f for c in args.classes for f in (c, f"{c}_half"))]
        else:
            count = make_pairs(args.photos, args.out, args.size, args.haze, args.noise_sigma, args.seed)
            folders = list(FOLDERS)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {count} photos to {args.out}/{{{','.join(folders)}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
