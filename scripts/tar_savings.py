"""What the webdataset layout saves by storing each clean image once per key.

    python scripts/tar_savings.py --out /tmp/savings                  # the demo recipe on examples/photos
    python scripts/tar_savings.py --out /tmp/savings --photos 1000    # on 1,000 distinct 128-px photo crops

Generates the demo recipe (`configs/demo.yaml`, mini, 7 variants) into the webdataset layout, then prints its
tars' bytes beside two alternatives for the same images: the folders layout (clean/ once + degraded/, file bytes)
and tars of one sample per (key, variant) as mdsd3 wrote them before, the clean image repeated in each (rebuilt in
memory from the tars' members with the same tar settings and member names, nothing written). `--photos N` first
writes N distinct crops (random position, scale and flip) of scikit-image's photos as inputs. Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdsd3_cli.dataset.tar_format import MEMBER_MODE, MEMBER_MTIME, flat_key, record_json  # noqa: E402
from mdsd3_cli.generate.plan import ShardSpec  # noqa: E402
from mdsd3_cli.generate.run import plan_run, run_generate  # noqa: E402
from mdsd3_cli.recipe.generate import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "brick",
    "grass",
    "gravel",
    "moon",
    "coins",
    "clock",
)
"""scikit-image's photos that ship with it (no download): colour photos, grey photos and textures."""


def write_crops(folder: Path, count: int, size: int = 128, seed: int = 0) -> None:
    """`count` distinct `size`-px crops of scikit-image's photos: random photo, scale, position and flip."""
    from skimage import data

    photos = [np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB")) for name in SKIMAGE_PHOTOS]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        photo = Image.fromarray(photos[rng.randrange(len(photos))])
        scale = rng.uniform(size / min(photo.size), 1.0)
        photo = photo.resize(
            (max(size, round(photo.width * scale)), max(size, round(photo.height * scale))), Image.Resampling.LANCZOS
        )
        left, top = rng.randrange(photo.width - size + 1), rng.randrange(photo.height - size + 1)
        crop = photo.crop((left, top, left + size, top + size))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(folder / f"crop{index:05d}.png")


class _Counter(io.RawIOBase):
    """A write-only sink that counts bytes."""

    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.count

    def write(self, data) -> int:
        self.count += len(data)
        return len(data)


def per_pair_tar_bytes(tar: Path) -> int:
    """Bytes of `tar`'s images as tars of one sample per (key, folder): `<key>/<folder>.clean.<ext>`,
    `.degraded.<ext>` and `.json` (the record naming those members), the layout mdsd3 wrote before."""
    sink = _Counter()
    with tarfile.open(tar) as source, tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as target:
        members = {member.name: member for member in source.getmembers()}
        for name in [name for name in members if name.endswith(".json")]:
            for folder, record in json.loads(source.extractfile(name).read()).items():
                extension = record["clean_member"].rsplit(".", 1)[1]
                stem = f"{flat_key(record['key'])}/{flat_key(folder)}"
                old = {
                    "clean_member": f"{stem}.clean.{extension}",
                    "degraded_member": f"{stem}.degraded.{extension}",
                    "json_member": f"{stem}.json",
                }
                images = [source.extractfile(record[role]).read() for role in ("clean_member", "degraded_member")]
                for member, data in zip(old.values(), [*images, record_json({**record, **old})]):
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = len(data), MEMBER_MTIME, MEMBER_MODE
                    target.addfile(info, io.BytesIO(data))
    return sink.count


def folders_bytes(out: Path) -> int:
    """The image bytes the folders layout writes for the same records: each clean image once, each degraded one."""
    clean, degraded = {}, 0
    for manifest in sorted((out / "manifest").glob("*.jsonl")):
        for line in manifest.read_text().splitlines():
            record = json.loads(line)
            clean[record["key"]] = record["clean_bytes"]
            degraded += record["degraded_bytes"]
    return sum(clean.values()) + degraded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (must not hold another run)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/demo.yaml")
    parser.add_argument("--photos", type=int, default=None, help="generate on this many distinct photo crops")
    args = parser.parse_args()
    overrides = [f"output.dir={args.out / 'dataset'}", "output.layout=webdataset"]
    if args.photos:
        write_crops(args.out / "photos", args.photos)
        overrides.append(f"input.paths=[{args.out / 'photos'}]")
    recipe = load_recipe(args.config, overrides)
    started = time.perf_counter()
    summary = run_generate(plan_run(recipe, ShardSpec(0, 1)))
    out = recipe.output_dir()
    tars = sorted((out / "tars").glob("*.tar"))
    keys = {
        json.loads(line)["key"]
        for manifest in (out / "manifest").glob("*.jsonl")
        for line in manifest.read_text().splitlines()
    }
    now, before = sum(tar.stat().st_size for tar in tars), sum(per_pair_tar_bytes(tar) for tar in tars)
    print(
        f"{args.config.name} on {len(keys)} photos, {len(recipe.variants)} variants: generate "
        f"{time.perf_counter() - started:.0f} s, {summary.written + summary.already_done} samples, {len(tars)} tars"
    )
    print(f"  tars, one sample per key (clean once)      {now / 2**20:9.2f} MiB")
    print(f"  tars, one sample per (key, variant), before {before / 2**20:9.2f} MiB")
    print(f"  folders layout (image files)               {folders_bytes(out) / 2**20:9.2f} MiB")
    print(f"  saved against before                       {(before - now) / 2**20:9.2f} MiB ({1 - now / before:.1%})")


if __name__ == "__main__":
    main()
