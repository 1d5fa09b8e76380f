#!/usr/bin/env python3
"""Synthetic clean/degraded training pairs from clean photos, with the physical degradations of
mdsd3_cli/degradations.py (haze, rain, noise, low_light: see that module for each model, its parameters and how
a ratio maps to them).

    python scripts/make_synthetic_pairs.py --photos examples/photos --out out/synthetic_pairs --size 128

writes OUT/clean/<name>.png and, for each class C of --classes (default: haze noise), OUT/C/<name>.png at
--ratio (default 1) and OUT/C_half/<name>.png at half that ratio (same basenames, so each degraded folder pairs
with clean/ as a `paired_folders` dataset; label the half folders with ratio 0.5 to teach what it means). One
class per pair, never mixed. Each photo's random parameters (rain streaks, noise, haze depth) come from --seed
and its file name; the half version draws the same ones, so it differs only in strength.

`--size N` first scales each photo so its short side is N (do this at the training resolution: noise added at
a larger size and then downscaled by the data loader would be averaged away). PNG only: JPEG would smear the
noise. Synthetic degradations teach the method; real training data should be real degradations.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdsd3_cli.degradations import CLASSES, DEGRADATIONS, quantize  # noqa: E402

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _load(path: Path, size: int | None) -> Image.Image:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    if size:
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image


def _save(array: np.ndarray, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(target)


def make_pairs(photos: Path, out: Path, size: int | None = None, classes: Sequence[str] = ("haze", "noise"),
               ratio: float = 1.0, seed: int = 0) -> int:
    """Write clean/ and, per class, C/ (at `ratio`) and C_half/ (at `ratio / 2`) under `out` for every photo in
    `photos`; returns the number of photos."""
    unknown = sorted(set(classes) - set(CLASSES))
    if unknown:
        raise ValueError(f"unknown classes {unknown}; choose from {list(CLASSES)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio {ratio} must lie in [0, 1]")
    paths = sorted(p for p in Path(photos).iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and not p.name.startswith("."))
    if not paths:
        raise FileNotFoundError(f"no photos ({', '.join(sorted(PHOTO_SUFFIXES))}) in {photos}")
    folders = ["clean", *classes, *(f"{name}_half" for name in classes)]
    for folder in folders:
        (Path(out) / folder).mkdir(parents=True, exist_ok=True)
    for path in paths:
        pixels = np.asarray(_load(path, size))
        _save(pixels, Path(out) / "clean" / f"{path.stem}.png")
        clean = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
        for name in classes:
            for folder, amount in ((name, ratio), (f"{name}_half", ratio / 2)):
                generator = torch.Generator().manual_seed(_name_seed(seed, f"{name}:{path.stem}"))
                degraded = quantize(DEGRADATIONS[name](clean, amount, generator))[0]
                array = (degraded * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                _save(array, Path(out) / folder / f"{path.stem}.png")
    return len(paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, required=True, help="folder of clean photos")
    parser.add_argument("--out", type=Path, required=True, help="output folder (gets clean/, C/ and C_half/ per class)")
    parser.add_argument("--size", type=int, default=None, help="scale each photo's short side to this first")
    parser.add_argument("--classes", nargs="+", default=["haze", "noise"], choices=CLASSES, help="degradation classes")
    parser.add_argument("--ratio", type=float, default=1.0, help="strength in [0, 1] of the C/ folders (C_half/: half)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        count = make_pairs(args.photos, args.out, args.size, args.classes, args.ratio, args.seed)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {count} photos to {args.out}/ (clean/ and {', '.join(args.classes)} with _half/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
