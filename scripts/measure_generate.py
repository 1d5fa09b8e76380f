"""How well `mdsd3 generate` hides decoding and encoding behind sampling.

Runs `generate` (tiny preset by default) on real photos, then the sampler alone on the same batches with the
images already decoded, and prints one JSON line per figure:
  sampler_busy          share of generate's wall time spent inside the sampler (target >= 0.9)
  generate_images_per_s images/s of the whole generate run (decode + sample + encode + write)
  sampler_images_per_s  images/s of the sampler alone on the same batches

    python scripts/measure_generate.py --size 512 --steps 8 --images 12
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from skimage import data

from mdsd3_cli.generate.plan import ShardSpec
from mdsd3_cli.generate.run import plan_run, run_generate
from mdsd3_cli.model.heads import all_prompts
from mdsd3_cli.pipeline.pipeline import MDSD3Pipeline
from mdsd3_cli.recipe.generate import load_recipe
from mdsd3_cli.util.images import load_image
from mdsd3_cli.util.runtime import resolve_device, resolve_dtype

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "immunohistochemistry", "hubble_deep_field"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--images", type=int, default=12, help="source photos (each gives 2 samples)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--format", default="png", choices=["png", "jpeg", "webp"])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mdsd3-measure-"))
    photos = work / "photos"
    photos.mkdir()
    for index in range(args.images):
        image = Image.fromarray(getattr(data, PHOTOS[index % len(PHOTOS)])()).convert("RGB")
        image = image.resize((args.size * 3 // 2, args.size * 5 // 4), Image.Resampling.BICUBIC)
        image.save(photos / f"photo{index:03d}.png")
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "base": args.base,
                    "classes": ["rain", "haze", "noise"],
                    "prompt_cache": str(work / "prompts"),
                },
                "input": {"paths": [str(photos)], "size": args.size},
                "output": {"dir": str(work / "out"), "format": args.format},
                "sampling": {"steps": args.steps, "guidance": 4.0, "beta": 0.3, "batch_size": args.batch},
                "variants": [
                    {"name": "rain", "classes": {"rain": 1.0}},
                    {"name": "mix", "classes": {"haze": 0.5, "noise": 1.0}},
                ],
            }
        )
    )
    recipe = load_recipe(recipe_path)
    device = resolve_device(recipe.model.device)
    dtype = resolve_dtype(recipe.model.dtype, device)
    pipeline = MDSD3Pipeline.from_recipe(recipe, device, dtype)
    pipeline.embed(all_prompts(recipe.classes()))  # warm the cache: neither measurement encodes prompts

    run = plan_run(recipe, ShardSpec(0, 1))
    summary = run_generate(run)
    common = {
        "size": args.size,
        "steps": args.steps,
        "batch": args.batch,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "samples": summary.written,
        "format": args.format,
    }
    print(json.dumps({"measure": "sampler_busy", "value": round(summary.sampler_busy, 3), **common}))
    print(json.dumps({"measure": "generate_images_per_s", "value": round(summary.images_per_s, 3), **common}))

    sampler = pipeline.sampler
    items = run.mine
    pixels = {item.key: load_image(item.source, args.size, "center_crop").pixels for item in items}
    start = time.perf_counter()
    for first in range(0, len(items), args.batch):
        batch = items[first : first + args.batch]
        sampler.generate(
            torch.from_numpy(np.stack([pixels[i.key] for i in batch])),
            [i.request for i in batch],
            args.steps,
            recipe.sampling.guidance,
            pad_to=args.batch,
        )
    alone = len(items) / (time.perf_counter() - start)
    print(json.dumps({"measure": "sampler_images_per_s", "value": round(alone, 3), **common}))


if __name__ == "__main__":
    main()
