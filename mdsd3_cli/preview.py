"""Contact sheets: one row per sampled key, the clean image then each variant, labelled."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .manifest import MEMBER_FIELDS, TAR_FIELD

LABEL_HEIGHT = 18
MIN_CELL = 96
"""Smallest cell a contact sheet shrinks to for small images (labels stay readable); smaller images are enlarged."""


def read_manifests(dataset: Path) -> list[dict]:
    """All complete manifest records of a generate output folder."""
    records = []
    for path in sorted((dataset / "manifest").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
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
            if record is None:
                label = "missing"
            elif name == "clean":
                label = key
            else:
                label = " ".join(f"{c}={v:.2g}" for c, v in record["ratios"].items() if v > 0) or "no class"
            if record is not None:
                with Image.open(_image_file(dataset, record, "clean" if name == "clean" else "degraded")) as image:
                    thumb = ImageOps.contain(image.convert("RGB"), (cell, cell), Image.Resampling.NEAREST
                                             if max(image.size) < cell else Image.Resampling.LANCZOS)
                    sheet.paste(thumb, (left + (cell - thumb.width) // 2, top + LABEL_HEIGHT))
            draw.text((left + 3, top + 3), label[-width:] if name == "clean" else label[:width], fill="dimgray", font=font)
    return sheet


def _image_file(dataset: Path, record: dict, role: str) -> Path | io.BytesIO:
    """A record's image: its file (folders layout) or its tar member (webdataset layout)."""
    if TAR_FIELD not in record:
        return dataset / record[role]
    with tarfile.open(dataset / record[TAR_FIELD]) as archive:
        return io.BytesIO(archive.extractfile(record[MEMBER_FIELDS[role]]).read())
