#!/usr/bin/env python3
"""The mini model's acceptance figures on the photos held out of its training, measured with `mdsd3 evaluate`.

    python scripts/mini_figures.py [--out DIR]     # prints JSON
    python scripts/mini_figures.py --rain-speed    # the training rain's speed, images/s on one thread

Time: 36 s in all (the 256-px seam run included) for mini v2 (4 steps, grid_shifts 2) on the two cores of an AMD EPYC CPU,
beside other jobs.

Generates, at the demo's size and sampling settings (configs/demo.yaml), the identity (no class, with
repeats), every class at ratios 0.25 / 0.5 / 0.75 / 1 (repeats at 1) and rain + haze together, on chelsea
and coffee, then evaluates the output folder as `mdsd3 evaluate --dataset` does and prints: identity PSNR,
the identity's blur loss (evaluate's blur estimator: the fraction of fine detail lost), per class the Spearman
correlation of ratio vs strength, the selectivity at each ratio, the median strength
per ratio, the strength at ratio 1 over the training pairs' (mdsd3_cli/model/presets/degradations.py at ratio 1 on the same
photos, same estimators), the repeat difference; the composition of rain + haze; and the seam ratio of every
variant (`mdsd3 evaluate`'s seam measure on mini's 8-pixel token grid, 1.0 = no mosaic), at 128 px and, for the
identity, each class at ratio 1 and rain + haze, at 256 px. tests/test_mini_acceptance.py
asserts on these figures; docs/mini.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdsd3_cli.evaluate import evaluate_dataset, measure_pair  # noqa: E402
from mdsd3_cli.evaluate.aggregate import SELECTIVITY_FLOOR  # noqa: E402
from mdsd3_cli.generate.plan import ShardSpec  # noqa: E402
from mdsd3_cli.generate.run import plan_run, run_generate  # noqa: E402
from mdsd3_cli.model.presets.build_mini import MINI_CLASSES  # noqa: E402
from mdsd3_cli.model.presets.degradations import degrade_photo  # noqa: E402
from mdsd3_cli.model.presets.mini_photos import HELD_OUT  # noqa: E402
from mdsd3_cli.recipe.generate import load_recipe  # noqa: E402

RATIOS = (0.25, 0.5, 0.75, 1.0)
REPEATS = 2
CALIBRATION_SEEDS = 4
COMPOSED = ("rain", "haze")
LARGE = 256
"""The second size the seam ratio is measured at (mini was trained at 128 px)."""
SEAM_GRID = 8
"""mini's token size in pixels (codec ×4, patch 2)."""


def variant_name(cls: str, ratio: float) -> str:
    """Variant of one class at one ratio: rain_025 ... rain_100."""
    return f"{cls}_{round(ratio * 100):03d}"


def acceptance_variants() -> list[dict[str, Any]]:
    """Identity (repeated), every class at each ratio (repeated at 1), rain + haze."""
    variants = [{"name": "identity", "classes": {}, "repeats": REPEATS}]
    for cls in MINI_CLASSES:
        variants += [
            {"name": variant_name(cls, r), "classes": {cls: r}, "repeats": REPEATS if r == 1.0 else 1} for r in RATIOS
        ]
    variants.append({"name": "_".join(COMPOSED), "classes": {cls: 1.0 for cls in COMPOSED}, "repeats": 1})
    return variants


def large_variants() -> list[dict[str, Any]]:
    """The seam check at LARGE px: identity, each class at ratio 1, rain + haze (one draw each)."""
    return [
        {"name": "identity", "classes": {}},
        *({"name": variant_name(cls, 1.0), "classes": {cls: 1.0}} for cls in MINI_CLASSES),
        {"name": "_".join(COMPOSED), "classes": {cls: 1.0 for cls in COMPOSED}},
    ]


def demo_size() -> int:
    """configs/demo.yaml's input.size."""
    return int(yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["input"]["size"])


def acceptance_recipe(
    root: Path, size: int | None = None, variants: list[dict[str, Any]] | None = None, grey: bool = False
) -> Path:
    """Copy the held-out photos to root/photos (as greyscale RGB with `grey`) and write root/recipe.yaml (output:
    root/out); the demo's size and `acceptance_variants()` unless given."""
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    if demo["model"] != {"base": "mini", "adapter": "mini"}:
        raise SystemExit(f"configs/demo.yaml does not use the mini preset: {demo['model']}")
    photos = root / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for name in HELD_OUT:
        source = ROOT / "examples" / "photos" / f"{name}.jpg"
        if grey:
            Image.open(source).convert("L").convert("RGB").save(photos / f"{name}.png")
        else:
            shutil.copy2(source, photos / f"{name}.jpg")
    recipe = {
        "model": {"base": "mini", "adapter": "mini", "device": "cpu"},
        "input": {"paths": [str(photos)], "size": size or demo_size(), "resize": "center_crop"},
        "output": {"dir": str(root / "out"), "format": "png"},
        "sampling": demo["sampling"],
        "variants": variants or acceptance_variants(),
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def among_classes(selectivity: dict[str, Any]) -> float:
    """A selectivity entry's own move over the largest move of mini's other classes. evaluate's own figure also
    counts the blur estimator, which is not a mini class: mini's identity reads about 0.7 on it (it loses fine
    detail) and the texture haze, noise and low light add moves it back, so that figure reads a side effect."""
    moves = selectivity["moves"]
    others = [abs(moves[name]) for name in MINI_CLASSES if name != selectivity["class"]]
    return moves[selectivity["class"]] / max(max(others), SELECTIVITY_FLOOR)


def training_strength(photo: np.ndarray, cls: str, seed: int) -> float:
    """`cls`'s measured strength on `photo` degraded by the training degradation at ratio 1."""
    return measure_pair(photo, degrade_photo(photo, cls, 1.0, torch.Generator().manual_seed(seed)))[cls]


def figures(root: Path, large: bool = True, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Generate and evaluate under `root` (see the module docstring); the figures as a JSON-ready dict. `large`:
    also the seam ratios at LARGE px (about half as long again as the rest). `overrides` (`--set`) change the
    demo's settings in every run, e.g. `sampling.class_guidance.rain=1.5`."""
    run_generate(plan_run(load_recipe(acceptance_recipe(root), overrides), ShardSpec(0, 1)))
    out = root / "out"
    report = evaluate_dataset(dataset=out, workers=2, seam_grid=SEAM_GRID)

    def seams(evaluated: Any) -> dict[str, float]:
        return {name: stats["measures"]["seam"]["median"] for name, stats in evaluated.summary["variants"].items()}

    def median(variant: str, cls: str) -> float:
        return report.variant(variant)["measures"][cls]["median"]

    def moved(variant: str, cls: str) -> float:
        return median(variant, cls) - median("identity", cls)

    clean = [np.asarray(Image.open(path).convert("RGB")) for path in sorted((out / "clean").glob("*.png"))]
    identity_diversity = report.variant("identity")["diversity"]["median"]
    classes = {}
    for cls in MINI_CLASSES:
        reference = float(
            np.median([training_strength(photo, cls, seed) for photo in clean for seed in range(CALIBRATION_SEEDS)])
        )
        top = variant_name(cls, 1.0)
        classes[cls] = {
            "spearman": report.summary["monotonicity"][cls]["spearman_single_class"],
            "single_class_samples": report.summary["monotonicity"][cls]["single_class_samples"],
            "medians": [median("identity", cls)] + [median(variant_name(cls, r), cls) for r in RATIOS],
            "selectivity": {str(r): report.summary["selectivity"][variant_name(cls, r)]["ratio"] for r in RATIOS},
            "selectivity_class": {str(r): report.summary["selectivity"][variant_name(cls, r)]["class"] for r in RATIOS},
            "selectivity_among_classes": {
                str(r): among_classes(report.summary["selectivity"][variant_name(cls, r)]) for r in RATIOS
            },
            "training_strength": reference,
            "calibration": median(top, cls) / reference,
            "repeat_difference": report.variant(top)["diversity"]["median"],
            "repeat_groups": report.variant(top)["diversity"]["groups"],
            "repeat_over_identity": report.variant(top)["diversity"]["median"] / max(identity_diversity, 0.5),
        }
    composed = "_".join(COMPOSED)
    return {
        "held_out": list(HELD_OUT),
        "samples": len(report.samples()),
        "identity_psnr": [row["psnr"] for row in report.samples() if row["variant"] == "identity"],
        "identity_blur": report.variant("identity")["measures"]["blur"]["median"],
        "identity_repeat_difference": identity_diversity,
        "classes": classes,
        "composition": {cls: moved(composed, cls) / moved(variant_name(cls, 1.0), cls) for cls in COMPOSED},
        "grey_identity_colour": grey_identity_colour(root, overrides),
        "seam_grid": SEAM_GRID,
        "seam": {
            str(demo_size()): seams(report),
            **({str(LARGE): seams(large_figures(root, overrides))} if large else {}),
        },
    }


def grey_identity_colour(root: Path, overrides: Sequence[str] = ()) -> float:
    """Colour the identity adds to greyscale versions of the held-out photos: the mean over pixels of the
    standard deviation across R, G, B, in 8-bit levels (0 for a grey image)."""
    folder = root / "grey"
    run_generate(
        plan_run(
            load_recipe(
                acceptance_recipe(folder, variants=[{"name": "identity", "classes": {}}], grey=True), overrides
            ),
            ShardSpec(0, 1),
        )
    )
    images = [
        np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        for path in sorted((folder / "out" / "degraded" / "identity").glob("*.png"))
    ]
    return float(np.mean([image.std(axis=2).mean() for image in images]))


def large_figures(root: Path, overrides: Sequence[str] = ()) -> Any:
    """The evaluate report of `large_variants()` generated at LARGE px under root/LARGE."""
    folder = root / str(LARGE)
    recipe = load_recipe(acceptance_recipe(folder, LARGE, large_variants()), overrides)
    run_generate(plan_run(recipe, ShardSpec(0, 1)))
    return evaluate_dataset(dataset=folder / "out", workers=2, seam_grid=SEAM_GRID)


def rain_speed(sizes: tuple[int, ...] = (128, 256, 512), seconds: float = 3.0) -> dict[str, float]:
    """Images per second of the training rain (ratio 1, one image per call) on one thread, per size: CPU time,
    so other jobs on the machine do not count."""
    import time

    from mdsd3_cli.model.presets.degradations import rain

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    speeds = {}
    for size in sizes:
        image = torch.rand((1, 3, size, size), generator=generator)
        rain(image, 1.0, generator)
        count, started = 0, time.process_time()
        while time.process_time() - started < seconds:
            rain(image, 1.0, generator)
            count += 1
        speeds[str(size)] = round(count / (time.process_time() - started), 1)
    return speeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--rain-speed", action="store_true", help="only print the training rain's images/s per size")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change a demo setting in every run, as `mdsd3 generate --set` does (repeatable), e.g. "
        "sampling.class_guidance.rain=1.5",
    )
    args = parser.parse_args()
    if args.rain_speed:
        print(json.dumps({"rain_images_per_cpu_second": rain_speed()}, indent=2))
        return 0
    if args.out is not None:
        print(json.dumps(figures(args.out, overrides=args.set), indent=2))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(figures(Path(tmp), overrides=args.set), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
