"""Contact sheets: one row per sampled key, the clean image then each variant, labelled."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from mdsd3_cli.dataset.manifest import ManifestLineError, manifest_files, parse_record
from mdsd3_cli.dataset.stored_images import record_image

LABEL_HEIGHT = 18
MIN_CELL = 96
"""Smallest cell a contact sheet shrinks to for small images (labels stay readable); smaller images are enlarged."""


def read_manifests(dataset: Path) -> list[dict]:
    """All complete, well-formed manifest records of a generate output folder (either layout)."""
    records = []
    for path in manifest_files(dataset):
        with open(path, "rb") as handle:
            for line in handle:
                try:
                    records.append(parse_record(line))
                except ManifestLineError:
                    continue
    return records


def contact_sheet(dataset: Path, count: int = 16, cell: int = 192, seed: int = 0) -> Image.Image:
    """A grid: a header row of folder names, then up to `count` randomly chosen keys, one per row: the clean
    image and every variant folder's image, each labelled (key, or the sample's class ratios).

    Cells are `cell` pixels, or smaller for smaller images (at least MIN_CELL); images fill their cell."""
    if not dataset.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {dataset}")
    records = read_manifests(dataset)
    if not records:
        raise FileNotFoundError(f"{dataset} has no manifest records (is it an mdsd3 generate output folder?)")
    by_key: dict[str, dict[str, dict]] = defaultdict(dict)
    for record in records:
        by_key[record["key"]][record["folder"]] = record
    folders = sorted({record["folder"] for record in records})
    keys = sorted(by_key)
    keys = sorted(random.Random(seed).sample(keys, min(count, len(keys))))
    largest = max(max(record.get("size") or [cell]) for key in keys for record in by_key[key].values())
    cell = min(cell, max(largest, MIN_CELL))  # no wide white margins around small images
    columns = ["clean", *folders]
    sheet = Image.new("RGB", (cell * len(columns), LABEL_HEIGHT + (cell + LABEL_HEIGHT) * len(keys)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    width = max(cell // 6, 8)
    for column, name in enumerate(columns):  # header: one folder name per column
        draw.text((column * cell + 3, 3), name[:width], fill="black", font=font)
    for row, key in enumerate(keys):
        top = LABEL_HEIGHT + row * (cell + LABEL_HEIGHT)
        any_record = next(iter(by_key[key].values()))
        for column, name in enumerate(columns):
            record = any_record if name == "clean" else by_key[key].get(name)
            left = column * cell
            role = "clean" if name == "clean" else "degraded"
            image_ref = None if record is None else record_image(dataset, record, role)
            if image_ref is None:
                label = "missing" if record is None else "outside the dataset"
            elif name == "clean":
                label = key
            else:
                label = " ".join(f"{c}={v:.2g}" for c, v in record["ratios"].items() if v > 0) or "no class"
            if image_ref is not None:
                with Image.open(image_ref.open()) as image:
                    thumb = ImageOps.contain(image.convert("RGB"), (cell, cell), Image.Resampling.NEAREST
                                             if max(image.size) < cell else Image.Resampling.LANCZOS)
                    sheet.paste(thumb, (left + (cell - thumb.width) // 2, top + LABEL_HEIGHT))
            draw.text((left + 3, top + 3), label[-width:] if name == "clean" else label[:width], fill="dimgray", font=font)
    return sheet
