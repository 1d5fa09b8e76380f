"""Write throughput of the folders and webdataset layouts on one recipe (default: the demo), and verify's speed.

    python scripts/benchmark_formats.py [--config configs/demo.yaml] [--copies 20] [--workers 2]

1. `generate` once per layout (same recipe, fresh output folders): end-to-end images/s (the sampler dominates).
2. The writers alone: the run's pairs (decoded once) are submitted `--copies` times under new keys through each
   layout's writer: pairs/s and MiB/s of encoding + writing, what a fast GPU leaves the writer to do.
3. `verify` on each writer-only output: files/s and MiB/s (hashing + decoding on every core).
4. `export --to parquet` from each writer-only output: pairs/s (reading files vs tar members, SHA-256 checks).

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdsd3_cli.dataset.verify import verify_dataset  # noqa: E402
from mdsd3_cli.export.run import run_export  # noqa: E402
from mdsd3_cli.generate.layouts import open_layout_writer  # noqa: E402
from mdsd3_cli.generate.plan import ShardSpec  # noqa: E402
from mdsd3_cli.generate.run import plan_run, run_generate  # noqa: E402
from mdsd3_cli.recipe.generate import Recipe, load_recipe  # noqa: E402

LAYOUTS = ("folders", "webdataset")


def recipe_for(config: Path, out: Path, layout: str, workers: int) -> Recipe:
    return load_recipe(config, [f"output.dir={out}", f"output.layout={layout}", f"output.workers={workers}"])


def read_pairs(dataset: Path) -> dict[tuple[str, str], tuple[dict, np.ndarray, np.ndarray]]:
    pairs = {}
    for manifest in sorted((dataset / "manifest").glob("*.jsonl")):
        for line in manifest.read_text().splitlines():
            record = json.loads(line)
            clean, degraded = (
                np.asarray(Image.open(dataset / record[role]).convert("RGB")) for role in ("clean", "degraded")
            )
            pairs[record["key"], record["folder"]] = (record, clean, degraded)
    return pairs


def time_writer(recipe: Recipe, pairs: dict, copies: int) -> tuple[float, int, int]:
    """Seconds, pairs and bytes to write `copies` copies of `pairs` through the recipe's layout writer."""
    shard = ShardSpec(0, 1)
    items = [
        dataclasses.replace(item, key=f"{item.key}_{copy}")
        for copy in range(copies)
        for item in plan_run(recipe, shard).mine
    ]
    started = time.perf_counter()
    with open_layout_writer(recipe, shard, lambda: items) as writer:
        for item in items:
            record, clean, degraded = pairs[item.key.rsplit("_", 1)[0], item.folder]
            writer.submit(
                {**{k: v for k, v in record.items() if k not in ("clean", "degraded")}, "key": item.key},
                clean,
                degraded,
            )
        writer.drain()
    return time.perf_counter() - started, len(items), writer.bytes_written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs/demo.yaml")
    parser.add_argument("--copies", type=int, default=20, help="copies of the run's pairs for the writer-only timing")
    parser.add_argument("--workers", type=int, default=2, help="output.workers (encoding threads)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mdsd3-formats-") as scratch:
        root = Path(scratch)
        print(f"recipe {args.config}; output.workers={args.workers}")
        for layout in LAYOUTS:
            recipe = recipe_for(args.config, root / f"generate_{layout}", layout, args.workers)
            summary = run_generate(plan_run(recipe, ShardSpec(0, 1)))
            print(
                f"generate  {layout:10s}: {summary.written} pairs in {summary.elapsed_s:.1f} s = "
                f"{summary.images_per_s:.2f} pairs/s (sampler busy {100 * summary.sampler_busy:.0f}%)"
            )
        pairs = read_pairs(root / "generate_folders")
        for layout in LAYOUTS:
            out = root / f"writer_{layout}"
            seconds, count, size = time_writer(recipe_for(args.config, out, layout, args.workers), pairs, args.copies)
            shutil.copy(root / "generate_folders" / "run.json", out / "run.json")  # verify reads the variants
            print(
                f"writer    {layout:10s}: {count} pairs, {size / 2**20:.1f} MiB in {seconds:.2f} s = "
                f"{count / seconds:.0f} pairs/s, {size / 2**20 / seconds:.1f} MiB/s"
            )
        for layout in LAYOUTS:
            report = verify_dataset(root / f"writer_{layout}")
            print(
                f"verify    {layout:10s}: {report.files} files, {report.bytes / 2**20:.1f} MiB in "
                f"{report.elapsed_s:.2f} s = {report.files_per_s:.0f} files/s, "
                f"{report.bytes / 2**20 / report.elapsed_s:.1f} MiB/s ({'ok' if report.ok else 'PROBLEMS'})"
            )
        for layout in LAYOUTS:
            exported = run_export(root / f"writer_{layout}", "parquet", root / f"parquet_from_{layout}")
            print(
                f"export    {layout:10s}: {exported.pairs} pairs, {exported.bytes_read / 2**20:.1f} MiB to parquet "
                f"in {exported.elapsed_s:.2f} s = {exported.pairs / exported.elapsed_s:.0f} pairs/s"
            )


if __name__ == "__main__":
    main()
