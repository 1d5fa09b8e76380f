"""Contact sheets: one row per sampled key, the clean image then each variant, labelled.

A record or image that cannot be shown is skipped and named (in `problems`), never a traceback: malformed
records, images missing or outside the dataset, missing or link tar members, damaged tars, decompression bombs."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from mdsd3_cli.dataset.manifest import ManifestLineError, record_ratios
from mdsd3_cli.dataset.names import CLEAN_FOLDER
from mdsd3_cli.dataset.reader import BadLine, ManifestEntry, manifest_entries
from mdsd3_cli.util.atomic import atomic_write
from mdsd3_cli.util.images import ImageError

LABEL_HEIGHT = 18
MIN_CELL = 96
"""Smallest cell a contact sheet shrinks to for small images (labels stay readable); smaller images are enlarged."""
MAX_COLUMNS = 64
"""Most variant folders shown (the sheet's memory stays bounded whatever the manifest names)."""


def _check(record: dict[str, Any]) -> None:
    """ManifestLineError when a record's `ratios` or `size` is unusable."""
    record_ratios(record)
    size = record.get("size")
    if size is not None and not (
        isinstance(size, list) and len(size) == 2 and all(isinstance(side, int) and side > 0 for side in size)
    ):
        raise ManifestLineError("'size' must be [width, height] in pixels")


def read_manifests(dataset: Path, problems: list[str] | None = None) -> list[ManifestEntry]:
    """All complete, well-formed manifest records of a generate output folder (either layout); each line left
    out is appended to `problems` as "FILE:LINE: reason"."""

    def bad(line: BadLine) -> None:
        if problems is not None and not line.blank:
            problems.append(f"{line.where}: {line.reason}")

    return list(manifest_entries(dataset, check=_check, bad=bad))


def contact_sheet(
    dataset: Path, count: int = 16, cell: int = 192, seed: int = 0, problems: list[str] | None = None
) -> Image.Image:
    """A grid: a header row of folder names, then up to `count` randomly chosen keys, one per row: the clean
    image and every variant folder's image, each labelled (key, or the sample's class ratios).

    Cells are `cell` pixels, or smaller for smaller images (at least MIN_CELL); images fill their cell. Records
    and images left out are appended to `problems` ("WHERE: reason"); their cells say why."""
    problems = [] if problems is None else problems
    if not dataset.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {dataset}")
    entries = read_manifests(dataset, problems)
    if not entries:
        raise FileNotFoundError(
            f"{dataset} has no usable manifest records (is it an mdsd3 generate output folder?)"
            + (f"; e.g. {problems[0]}" if problems else "")
        )
    by_key: dict[str, dict[str, ManifestEntry]] = defaultdict(dict)
    for entry in entries:
        by_key[entry.record["key"]][entry.record["folder"]] = entry
    keys = sorted(by_key)
    keys = sorted(random.Random(seed).sample(keys, min(count, len(keys))))
    folders = sorted({folder for key in keys for folder in by_key[key]})
    if len(folders) > MAX_COLUMNS:
        problems.append(f"{dataset}: {len(folders)} variant folders; the first {MAX_COLUMNS} are shown")
        folders = folders[:MAX_COLUMNS]
    largest = max(max(entry.record.get("size") or [cell]) for key in keys for entry in by_key[key].values())
    cell = min(cell, max(largest, MIN_CELL))  # no wide white margins around small images
    columns = [CLEAN_FOLDER, *folders]
    sheet = Image.new("RGB", (cell * len(columns), LABEL_HEIGHT + (cell + LABEL_HEIGHT) * len(keys)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    width = max(cell // 6, 8)
    for column, name in enumerate(columns):  # header: one folder name per column
        draw.text((column * cell + 3, 3), name[:width], fill="black", font=font)
    for row, key in enumerate(keys):
        top = LABEL_HEIGHT + row * (cell + LABEL_HEIGHT)
        any_entry = next(iter(by_key[key].values()))
        for column, name in enumerate(columns):
            clean = column == 0
            entry = any_entry if clean else by_key[key].get(name)
            left = column * cell
            role = "clean" if clean else "degraded"
            image_ref = None if entry is None else entry.clean if clean else entry.degraded
            if image_ref is None:
                label = "missing" if entry is None else "outside the dataset"
                if entry is not None:
                    problems.append(
                        f"key {key!r} folder {entry.record['folder']!r}: the {role} image path leaves the dataset folder"
                    )
            else:
                label = (
                    key
                    if clean
                    else " ".join(f"{c}={v:.2g}" for c, v in record_ratios(entry.record).items() if v > 0) or "no class"
                )
                try:
                    image = image_ref.read_rgb()
                except ImageError as error:
                    problems.append(f"{image_ref}: {error.reason}")
                    label = "unreadable"
                else:
                    thumb = ImageOps.contain(
                        image,
                        (cell, cell),
                        Image.Resampling.NEAREST if max(image.size) < cell else Image.Resampling.LANCZOS,
                    )
                    sheet.paste(thumb, (left + (cell - thumb.width) // 2, top + LABEL_HEIGHT))
            draw.text((left + 3, top + 3), label[-width:] if clean else label[:width], fill="dimgray", font=font)
    return sheet


def save_sheet(sheet: Image.Image, out: Path) -> None:
    """Write `sheet` to `out` in the format its extension names, through `atomic.atomic_write`: `out` is never
    seen partial, and a link found at `out` is replaced by the new file, never written through."""
    image_format = Image.registered_extensions().get(Path(out).suffix.lower())
    if image_format is None:
        raise ValueError(f"--out {out}: unknown image file extension (use e.g. .png)")
    atomic_write(Path(out), lambda file: sheet.save(file, format=image_format))
