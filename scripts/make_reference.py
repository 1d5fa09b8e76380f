#!/usr/bin/env python3
"""A stand-in "real" reference for `mdsd3 calibrate`: pairs from the photos mini never saw (chelsea, coffee),
degraded by mdsd3_cli/model/presets/degradations.py at per-sample strengths from skewed distributions.

    python scripts/make_reference.py --out out/reference

writes OUT/clean/<photo>_<i>.png and OUT/degraded/<class>/<photo>_<i>.png (--per-photo pairs per photo and class,
--size px centre crops). The strengths (ratios of the degradation module): haze mostly light (80 % in
0.05-0.3) with a few dense (0.7-1); noise a two-level mix (70 % at 0.1, 30 % at 0.3, ± 0.03: mini's
ratio 1 makes about the noise of the training degradation at 0.47, docs/mini.md); low light skewed
towards light (u², u uniform); with --classes rain, rain uniform in 0.2-0.8. Deterministic for one --seed. Refuses an OUT that exists.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdsd3_cli.model.presets.degradations import degrade_photo  # noqa: E402
from mdsd3_cli.model.presets.mini_photos import HELD_OUT  # noqa: E402
from mdsd3_cli.util.images import fit_image  # noqa: E402

PHOTOS = Path(__file__).resolve().parents[1] / "examples" / "photos"
CLASSES = ("haze", "noise", "low_light")
OTHER_CLASSES = ("rain",)


def skewed_ratios(name: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` per-sample ratios of class `name` (see the module docstring)."""
    if name == "haze":
        return np.where(rng.random(count) < 0.8, rng.uniform(0.05, 0.3, count), rng.uniform(0.7, 1.0, count))
    if name == "noise":
        return np.clip(np.where(rng.random(count) < 0.7, 0.1, 0.3) + rng.normal(0, 0.03, count), 0, 1)
    if name == "low_light":
        return rng.random(count) ** 2
    if name == "rain":
        return rng.uniform(0.2, 0.8, count)
    raise ValueError(f"no distribution for class {name!r}; choose from {', '.join(CLASSES + OTHER_CLASSES)}")


def write_reference(
    out: Path, classes: Sequence[str] = CLASSES, per_photo: int = 12, size: int = 128, seed: int = 20
) -> Path:
    """Write the reference folder `out` (it must not exist) and return it."""
    rng = np.random.default_rng(seed)
    (out / "clean").mkdir(parents=True)
    for photo in HELD_OUT:
        pixels = fit_image(Image.open(PHOTOS / f"{photo}.jpg"), size, "center_crop").pixels
        for index in range(per_photo):
            Image.fromarray(pixels).save(out / "clean" / f"{photo}_{index:02d}.png")
        for number, name in enumerate(classes):
            (out / "degraded" / name).mkdir(parents=True, exist_ok=True)
            for index, ratio in enumerate(skewed_ratios(name, per_photo, rng)):
                generator = torch.Generator().manual_seed(seed * 100_000 + 1000 * number + index)
                degraded = degrade_photo(pixels, name, float(ratio), generator)
                Image.fromarray(degraded).save(out / "degraded" / name / f"{photo}_{index:02d}.png")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to create")
    parser.add_argument("--classes", nargs="+", default=list(CLASSES), choices=CLASSES + OTHER_CLASSES)
    parser.add_argument("--per-photo", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=20)
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists")
    write_reference(args.out, args.classes, args.per_photo, args.size, args.seed)
    print(f"wrote {args.out}: {2 * args.per_photo} pairs per class ({', '.join(args.classes)})")


if __name__ == "__main__":
    main()
