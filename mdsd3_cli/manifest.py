"""Reading a generate output's manifest: record lines, the fields each layout uses, the run's variant folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .recipe import MAX_REPEATS, MAX_SAMPLES_PER_INPUT
from .writer import RUN_JSON

TAR_FIELD = "tar"
FILE_FIELDS = ("clean", "degraded")
"""Folders layout: the images' paths relative to the dataset."""
MEMBER_FIELDS = {"clean": "clean_member", "degraded": "degraded_member", "json": "json_member"}
"""Webdataset layout: the sample's tar (`tar`, relative to the dataset) and its member names, by role."""


class ManifestLineError(ValueError):
    """A manifest line that holds no usable record."""


def parse_record(line: bytes) -> dict[str, Any]:
    """The record of one manifest line (a folders- or webdataset-layout record); ManifestLineError if unusable."""
    if not line.endswith(b"\n"):
        raise ManifestLineError("unfinished last line (a killed run; rerun generate)")
    try:
        record = json.loads(line)
    except ValueError as error:
        raise ManifestLineError(f"not JSON: {error}") from None
    in_tar = isinstance(record, dict) and TAR_FIELD in record
    needed = ["key", "folder", *([TAR_FIELD, *MEMBER_FIELDS.values()] if in_tar else FILE_FIELDS)]
    if not isinstance(record, dict) or not all(isinstance(record.get(name), str) for name in needed):
        raise ManifestLineError(f"a record needs the text fields {', '.join(needed)}")
    return record


def manifest_files(root: Path) -> list[Path]:
    """Every shard's manifest, in name order."""
    return sorted(Path(root).glob("manifest/*.jsonl"))


def run_info(root: Path) -> dict[str, Any]:
    """OUT/run.json (resolved recipe, classes, fingerprints); OSError or ValueError when missing or unreadable."""
    info = json.loads((Path(root) / RUN_JSON).read_text(encoding="utf-8"))
    if not isinstance(info, dict):
        raise ValueError(f"{Path(root) / RUN_JSON} does not hold a JSON object")
    return info


def run_folders(info: dict[str, Any]) -> list[str]:
    """The run's variant folders in recipe order (`<name>`, or `<name>_r<i>` with repeats); ValueError if absent
    or if the repeats exceed what a recipe may ask for (counted before any folder name is made)."""
    try:
        variants = info["recipe"]["variants"]
        repeats = [variant.get("repeats", 1) for variant in variants]
        if not all(type(count) is int and 1 <= count <= MAX_REPEATS for count in repeats) \
                or sum(repeats) > MAX_SAMPLES_PER_INPUT:
            raise ValueError(f"recipe.variants: repeats {_short_list(repeats)} are not what a recipe may "
                             f"ask for (1..{MAX_REPEATS} each, at most {MAX_SAMPLES_PER_INPUT:,} in all)")
        return [variant["name"] if count == 1 else f"{variant['name']}_r{repeat}"
                for variant, count in zip(variants, repeats) for repeat in range(1, count + 1)]
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"run.json lists no usable variants ({error!r})") from None


def _short_list(values: list[Any], shown: int = 5) -> str:
    return "[" + ", ".join(map(repr, values[:shown])) + (", ...]" if len(values) > shown else "]")
