"""The names of a generate output's folders and files (docs/output.md): every module spells them through here.

A variant folder's name (`<name>`, or `<name>_r<i>` with repeats) is the recipe's (`recipe.file.variant_folder`).
"""

from __future__ import annotations

import re
from pathlib import Path

CLEAN_FOLDER = "clean"
DEGRADED_FOLDER = "degraded"
MANIFEST_FOLDER = "manifest"
ERRORS_FOLDER = "errors"
TARS_FOLDER = "tars"
LOCKS_FOLDER = ".locks"
IMAGE_FOLDERS = (CLEAN_FOLDER, DEGRADED_FOLDER, TARS_FOLDER)
"""Where a run's images live (files, or tars): a file there without a record is an orphan."""
RUN_JSON = "run.json"
"""A run's record of itself, beside manifest/."""

MANIFEST_SUFFIX = ".jsonl"
"""A shard's manifest (`manifest/<shard>.jsonl`) and error log (`errors/<shard>.jsonl`)."""
ERRORS_SUFFIX = ".jsonl"
PLAN_SUFFIX = ".plan.json"
"""`manifest/<shard>.plan.json`: what the shard set out to write (`completeness`)."""
FINISHED_SUFFIX = ".finished.json"
"""`manifest/<shard>.finished.json`: the shard's last file."""
TARS_PLAN_SUFFIX = ".tars.json"
"""`manifest/<shard>.tars.json`: the webdataset layout's plan digest and tar names."""
LOCK_SUFFIX = ".lock"
SHARD_LOG_SUFFIXES = (MANIFEST_SUFFIX, TARS_PLAN_SUFFIX, PLAN_SUFFIX, FINISHED_SUFFIX)
"""Every file a shard writes in manifest/."""

SHARD_PATTERN = r"shard-(\d{5})-of-(\d{5})"
"""A shard's name, the stem of its manifest, error log and tars; groups: its index and the shard count."""
_SHARD = re.compile(SHARD_PATTERN)
_TAR = re.compile(rf"{SHARD_PATTERN}-(\d{{6}})\.tar")


def shard_name(index: int, count: int) -> str:
    """`shard-00003-of-00008`."""
    return f"shard-{index:05d}-of-{count:05d}"


def parse_shard(name: str) -> tuple[int, int] | None:
    """(index, count) of a shard name, or None when `name` is not one."""
    match = _SHARD.fullmatch(name)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def tar_name(shard: str, group: int) -> str:
    """The webdataset layout's tar of a shard's group of keys: `<shard>-<group:06d>.tar`."""
    return f"{shard}-{group:06d}.tar"


def parse_tar_name(name: str) -> tuple[int, int, int] | None:
    """(shard index, shard count, group) of a tar name, or None when `name` is not one."""
    match = _TAR.fullmatch(name)
    return None if match is None else (int(match.group(1)), int(match.group(2)), int(match.group(3)))


def shard_file(root: Path, folder: str, shard: str, suffix: str) -> Path:
    """OUT/<folder>/<shard><suffix> (not checked: shard names come from `shard_name`)."""
    return Path(root) / folder / f"{shard}{suffix}"


def own_logs(root: Path, folder: str, suffix: str) -> list[Path]:
    """The files named `<shard><suffix>` in OUT/<folder> (a shard's manifest, plan or error log), in name order:
    the only names there that mdsd3 writes."""
    return sorted(
        path
        for path in (Path(root) / folder).glob(f"*{suffix}")
        if path.name.endswith(suffix) and parse_shard(path.name[: -len(suffix)]) is not None
    )


def is_generate_output(path: Path) -> bool:
    """Whether `path` looks like a generate output: it has a manifest/ folder."""
    return (Path(path) / MANIFEST_FOLDER).is_dir()
