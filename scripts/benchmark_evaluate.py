#!/usr/bin/env python3
"""How fast `mdsd3 evaluate` measures pairs: prints figures, asserts nothing.

    python scripts/benchmark_evaluate.py --pairs 400 --size 512 --workers 2

Writes an mdsd3-style output folder to a temporary directory: scikit-image photos (flipped and rotated for more
keys), centre-cropped to SIZE², each with four classical degradations of known strength (noise, haze, rain,
low light) as four variants, recorded in a manifest. Then it measures them as `evaluate` does (decode in the
workers, every estimator, PSNR and SSIM) and prints pairs/s, worker start-up included (use enough pairs to
amortise it), and each measure's cost per pair in one process. Pin it to N cores with `taskset -c 0-(N-1)` to
measure N cores.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from mdsd3_cli.evaluate import classical
from mdsd3_cli.evaluate.aggregate import SampleTable, summarise
from mdsd3_cli.evaluate.estimators import Pair
from mdsd3_cli.evaluate.measures import CLASS_ESTIMATORS, GENERIC_MEASURES
from mdsd3_cli.evaluate.pairs import read_manifests
from mdsd3_cli.evaluate.runner import measure_groups, read_rgb, retain_freed_memory

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat", "immunohistochemistry", "hubble_deep_field")
VARIANTS = {
    "noise": ({"noise": 0.6}, lambda x, seed: classical.gaussian_noise(x, 15, seed)),
    "haze": ({"haze": 0.6}, lambda x, seed: classical.haze(x, 0.6)),
    "rain": ({"rain": 0.6}, lambda x, seed: classical.rain(x, 0.005, seed)),
    "low_light": ({"low_light": 0.6}, lambda x, seed: classical.low_light(x, 0.4)),
}


def square(name: str, size: int) -> np.ndarray:
    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side)))


def write_dataset(root: Path, pairs: int, size: int) -> int:
    """An mdsd3-style output of about `pairs` pairs; returns the number written."""
    keys = -(-pairs // len(VARIANTS))
    bases = [square(name, size) for name in PHOTOS]
    lines = []
    for index in range(keys):
        clean = np.ascontiguousarray(np.rot90(bases[index % len(bases)], index // len(bases) % 4))
        if index // (4 * len(bases)) % 2:
            clean = np.ascontiguousarray(clean[:, ::-1])
        key = f"k{index:05d}"
        (root / "clean").mkdir(parents=True, exist_ok=True)
        Image.fromarray(clean).save(root / "clean" / f"{key}.png", compress_level=1)
        for variant, (ratios, degrade) in VARIANTS.items():
            path = root / "degraded" / variant / f"{key}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(degrade(clean, index)).save(path, compress_level=1)
            lines.append(
                json.dumps(
                    {
                        "key": key,
                        "variant": variant,
                        "folder": variant,
                        "repeat": 1,
                        "ratios": ratios,
                        "clean": f"clean/{key}.png",
                        "degraded": f"degraded/{variant}/{key}.png",
                    }
                )
            )
    (root / "manifest").mkdir(exist_ok=True)
    (root / "manifest" / "shard-00000-of-00001.jsonl").write_text("".join(line + "\n" for line in lines))
    return len(lines)


def cost_by_measure(root: Path, groups: list, pairs: int = 20) -> dict[str, float]:
    """Milliseconds per pair of decoding and of each measure, in this process with the allocator set as in the
    workers (the shared planes a `Pair` caches are charged to the first measure that needs them)."""
    retain_freed_memory()
    totals: dict[str, float] = {}
    samples = [(group.clean, sample.image) for group in groups for sample in group.samples][:pairs]
    for clean_path, degraded_path in samples:
        started = time.perf_counter()
        clean, degraded = read_rgb(clean_path), read_rgb(degraded_path)
        totals["decode (2 images)"] = totals.get("decode (2 images)", 0.0) + time.perf_counter() - started
        pair = Pair(clean, degraded)
        for name, measure in {**GENERIC_MEASURES, **CLASS_ESTIMATORS}.items():
            started = time.perf_counter()
            measure(pair)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - started
    return {name: 1000 * total / len(samples) for name, total in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mdsd3-evaluate-bench-") as folder:
        root = Path(folder)
        started = time.perf_counter()
        count = write_dataset(root, args.pairs, args.size)
        print(f"wrote {count} pairs at {args.size}x{args.size} in {time.perf_counter() - started:.1f} s")
        source = read_manifests(root)
        table = SampleTable(source.classes)
        started = time.perf_counter()
        first_done = None
        for result in measure_groups(source.groups, args.workers):
            table.add(result)
            first_done = first_done or time.perf_counter()
        finished = time.perf_counter()
        summary = summarise(table, "bench")
        costs = cost_by_measure(root, source.groups)
    total = finished - started
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"workers={args.workers} cores available={cpus} size={args.size}")
    print(
        f"measured {len(table)} pairs in {total:.2f} s: {len(table) / total:.1f} pairs/s (worker start-up "
        f"included; first result after {first_done - started:.2f} s)"
    )
    print(
        "one process, ms per pair: "
        + ", ".join(f"{name} {ms:.1f}" for name, ms in costs.items())
        + f"; total {sum(costs.values()):.1f}"
    )
    for variant, stats in summary["variants"].items():
        medians = {name: stats["measures"][name]["median"] for name in ("psnr", variant)}
        print(f"  {variant:10s} " + "  ".join(f"{name} {value:.3f}" for name, value in medians.items()))


if __name__ == "__main__":
    main()
