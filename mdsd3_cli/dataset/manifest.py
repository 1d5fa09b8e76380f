"""Reading a generate output's manifest: record lines, the fields each layout uses, the run's variant folders."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from mdsd3_cli.dataset.names import RUN_JSON
from mdsd3_cli.recipe.file import MAX_REPEATS, MAX_SAMPLES_PER_INPUT, variant_folder
from mdsd3_cli.util.images import unsafe_key_reason
from mdsd3_cli.util.safe_names import safe_component

TAR_FIELD = "tar"
FILE_FIELDS = ("clean", "degraded")
"""Folders layout: the images' paths relative to the dataset."""
MEMBER_FIELDS = {"clean": "clean_member", "degraded": "degraded_member", "json": "json_member"}
"""Webdataset layout: the sample's tar (`tar`, relative to the dataset) and its member names, by role."""
MAX_LINE_BYTES = 1 << 20
"""Longest manifest line read (a record is well under 4 KiB); a longer one is a damaged line, never held whole."""
MAX_RUN_JSON_BYTES = 64 << 20
"""Largest run.json read (a resolved recipe is a few KiB)."""


class ManifestLineError(ValueError):
    """A manifest line that holds no usable record."""


def parse_record(line: bytes) -> dict[str, Any]:
    """The record of one manifest line (a folders- or webdataset-layout record); ManifestLineError if unusable."""
    if len(line) > MAX_LINE_BYTES:
        raise ManifestLineError(f"longer than {MAX_LINE_BYTES} bytes (not a record)")
    if not line.endswith(b"\n"):
        raise ManifestLineError("unfinished last line (a killed run; rerun generate)")
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as error:
        raise ManifestLineError(f"not JSON: {error}") from None
    in_tar = isinstance(record, dict) and TAR_FIELD in record
    needed = ["key", "folder", *([TAR_FIELD, *MEMBER_FIELDS.values()] if in_tar else FILE_FIELDS)]
    if not isinstance(record, dict) or not all(isinstance(record.get(name), str) for name in needed):
        raise ManifestLineError(f"a record needs the text fields {', '.join(needed)}")
    unsafe_key = unsafe_key_reason(record["key"])
    if unsafe_key is not None:
        raise ManifestLineError(f"key {record['key']!r}: {unsafe_key}")
    try:
        safe_component(record["folder"], "folder")
        if "variant" in record:
            safe_component(record["variant"], "variant")
    except ValueError as error:
        raise ManifestLineError(str(error)) from None
    return record


def number_problem(record: dict[str, Any]) -> str | None:
    """The first field of a record holding a number that is not finite or too large for a 64-bit float (JSON
    allows `1e999` and integers of any length; JSON writers and Parquet columns refuse them), named; else None."""

    def bad(value: Any) -> bool:
        if isinstance(value, dict):
            return any(bad(item) for item in value.values())
        if isinstance(value, list):
            return any(bad(item) for item in value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return not math.isfinite(float(value))
            except OverflowError:
                return True
        return False

    for name, value in record.items():
        try:
            found = bad(value)
        except RecursionError:
            return f"field {name!r} is nested too deeply"
        if found:
            return f"field {name!r} holds a number that is infinite, NaN or too large for a 64-bit float"
    return None


def record_ratios(record: dict[str, Any], required: bool = True) -> dict[str, float]:
    """A record's `ratios` as {class name: finite float}; {} when absent and not `required`; ManifestLineError
    when absent (and `required`) or not a mapping of names to finite numbers."""
    ratios = record.get("ratios")
    if ratios is None and not required:
        return {}
    if not isinstance(ratios, dict):
        raise ManifestLineError("'ratios' must map class names to numbers")
    try:
        converted = {
            name: float(value)
            for name, value in ratios.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
    except OverflowError:
        converted = {}
    if len(converted) != len(ratios) or not all(math.isfinite(value) for value in converted.values()):
        raise ManifestLineError("'ratios' must map class names to finite numbers")
    return converted


def open_regular(path: Path) -> BinaryIO:
    """`path` open for reading when it is a regular file (a pipe or device is refused, never waited on): OSError
    naming the path otherwise."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(f"{path}: not a regular file")
    return os.fdopen(descriptor, "rb")


def run_info(root: Path) -> dict[str, Any]:
    """OUT/run.json (resolved recipe, classes, fingerprints); OSError or ValueError when missing or unreadable."""
    path = Path(root) / RUN_JSON
    with open_regular(path) as file:  # read(n) allocates n bytes first: ask for no more than the file holds
        text = file.read(min(os.fstat(file.fileno()).st_size, MAX_RUN_JSON_BYTES) + 1)
    if len(text) > MAX_RUN_JSON_BYTES:
        raise ValueError(f"{path} is larger than {MAX_RUN_JSON_BYTES} bytes")
    try:
        info = json.loads(text.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return info


def run_folders(info: dict[str, Any]) -> list[str]:
    """The run's variant folders in recipe order (`<name>`, or `<name>_r<i>` with repeats); ValueError naming the
    field when absent or unusable (a name that is not one safe file name, repeats outside 1..MAX_REPEATS, more
    than MAX_SAMPLES_PER_INPUT folders: what a recipe may ask for, counted before any folder name is made)."""
    recipe = info.get("recipe")
    variants = recipe.get("variants") if isinstance(recipe, dict) else None
    if not isinstance(variants, list) or not variants:
        raise ValueError("recipe.variants: run.json lists no variants")
    named: list[tuple[str, int]] = []
    for index, variant in enumerate(variants):
        where = f"recipe.variants[{index}]"
        if not isinstance(variant, dict):
            raise ValueError(f"{where}: not a mapping")
        name, repeats = variant.get("name"), variant.get("repeats", 1)
        if not isinstance(name, str):
            raise ValueError(f"{where}.name: missing or not text")
        safe_component(name, f"{where}.name")
        if type(repeats) is not int or not 1 <= repeats <= MAX_REPEATS:
            raise ValueError(f"{where}.repeats: {repeats!r} is not an integer in 1..{MAX_REPEATS}")
        named.append((name, repeats))
    if sum(repeats for _, repeats in named) > MAX_SAMPLES_PER_INPUT:
        raise ValueError(
            f"recipe.variants: more than {MAX_SAMPLES_PER_INPUT:,} variant folders, more than a "
            "recipe may ask for (a damaged run.json?)"
        )
    return [variant_folder(name, repeat, repeats) for name, repeats in named for repeat in range(1, repeats + 1)]
