"""Where pairs come from: an mdsd3 output's manifests (every shard, finished or partial runs) or two folders
matched by relative path. Pairs are grouped by key, so a clean image is decoded once for all its variants and repeats."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..images import image_extensions


class EvaluateError(ValueError):
    """The dataset cannot be evaluated at all (no pairs, or not a dataset)."""


@dataclass(frozen=True)
class Problem:
    """A file or manifest line left out of the evaluation, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Sample:
    """One degraded image: its variant, folder (variant + repeat), repeat number and requested class ratios."""

    variant: str
    folder: str
    path: Path
    repeat: int = 1
    ratios: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PairGroup:
    """Every degraded image of one key (all variants and repeats) with their shared clean image."""

    key: str
    clean: Path
    samples: tuple[Sample, ...]


@dataclass
class PairSource:
    """The groups of one dataset, the classes its records name, and what was left out."""

    label: str
    groups: list[PairGroup]
    classes: list[str]
    problems: list[Problem]

    @property
    def sample_count(self) -> int:
        return sum(len(group.samples) for group in self.groups)


def open_dataset(path: Path, label: str | None = None) -> PairSource:
    """An mdsd3 output folder (its manifest/) or a folder holding clean/ and degraded/ matched by path."""
    path = Path(path)
    if not path.is_dir():
        raise EvaluateError(f"{path}: not a folder")
    if (path / "manifest").is_dir():
        return read_manifests(path, label)
    if (path / "clean").is_dir() and (path / "degraded").is_dir():
        return match_folders(path / "clean", path / "degraded", label or path.name)
    raise EvaluateError(f"{path}: neither an mdsd3 output (no manifest/ folder) nor a folder with clean/ and "
                        f"degraded/ subfolders")


def _inside(root: Path, relative: object) -> Path | None:
    """root/relative when `relative` is a relative path string that stays inside root, else None."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        return None
    target = root / relative
    return target if target.resolve().is_relative_to(root.resolve()) else None


def _sample_from_record(root: Path, record: object) -> tuple[str, Path, Sample] | str:
    """(key, clean, sample) of a manifest record, or the reason it is unusable."""
    if not isinstance(record, dict):
        return "not a JSON object"
    key, folder = record.get("key"), record.get("folder")
    if not isinstance(key, str) or not isinstance(folder, str):
        return "missing 'key' or 'folder'"
    clean, degraded = _inside(root, record.get("clean")), _inside(root, record.get("degraded"))
    if clean is None or degraded is None:
        return "'clean' or 'degraded' is missing or not a path inside the dataset"
    ratios = record.get("ratios", {})
    if not isinstance(ratios, dict) or not all(isinstance(v, (int, float)) for v in ratios.values()):
        return "'ratios' is not a mapping of class names to numbers"
    repeat = record.get("repeat", 1)
    variant = record.get("variant", folder)
    if not isinstance(repeat, int) or not isinstance(variant, str):
        return "'repeat' or 'variant' has the wrong type"
    sample = Sample(variant, folder, degraded, repeat, {str(name): float(value) for name, value in ratios.items()})
    return key, clean, sample


def read_manifests(root: Path, label: str | None = None) -> PairSource:
    """Every record of every OUT/manifest/*.jsonl (all shards, finished or not); bad lines become problems,
    a (key, folder) written twice counts once."""
    manifests = sorted(entry for entry in (root / "manifest").iterdir() if entry.suffix == ".jsonl" and entry.is_file())
    grouped: dict[str, tuple[Path, dict[str, Sample]]] = {}
    classes: dict[str, None] = {}
    problems: list[Problem] = []
    for manifest in manifests:
        with open(manifest, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                where = f"{manifest}:{number}"
                if not line.strip():
                    continue
                if not line.endswith(b"\n"):
                    problems.append(Problem(where, "unfinished line (a run still writing, or killed)"))
                    continue
                try:
                    parsed = _sample_from_record(root, json.loads(line))
                except ValueError as error:
                    parsed = f"not JSON: {error}"
                if isinstance(parsed, str):
                    problems.append(Problem(where, parsed))
                    continue
                key, clean, sample = parsed
                classes.update(dict.fromkeys(sample.ratios))
                _, samples = grouped.setdefault(key, (clean, {}))
                samples.setdefault(sample.folder, sample)
    groups = [PairGroup(key, clean, tuple(sorted(samples.values(), key=lambda s: (s.variant, s.repeat, s.folder))))
              for key, (clean, samples) in sorted(grouped.items())]
    ordered = [name for name in _run_classes(root) if name in classes]
    return PairSource(label or root.name, groups, ordered + [name for name in classes if name not in ordered],
                      problems)


def _run_classes(root: Path) -> list[str]:
    """The class order of OUT/run.json (manifest ratios are stored sorted); empty when it is unreadable."""
    try:
        classes = json.loads((root / "run.json").read_text(encoding="utf-8")).get("classes", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [name for name in classes if isinstance(name, str)] if isinstance(classes, list) else []


def _images_under(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative path without extension, file) of every image under `root`, hidden entries skipped, sorted."""
    extensions = image_extensions()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if not name.startswith(".") and path.suffix.lower() in extensions:
                yield path.relative_to(root).with_suffix("").as_posix(), path


def match_folders(clean_dir: Path, degraded_dir: Path, label: str | None = None) -> PairSource:
    """Pairs of a degraded folder and a clean folder with the same relative path (extension may differ);
    a degraded image without a clean one is a problem. The variant is the degraded folder's name."""
    for folder in (clean_dir, degraded_dir):
        if not Path(folder).is_dir():
            raise EvaluateError(f"{folder}: not a folder")
    clean_by_key: dict[str, Path] = {}
    for key, path in _images_under(clean_dir):
        clean_by_key.setdefault(key, path)
    variant = Path(degraded_dir).resolve().name
    groups, problems = [], []
    for key, path in _images_under(degraded_dir):
        clean = clean_by_key.get(key)
        if clean is None:
            problems.append(Problem(str(path), f"no clean image {key}.* in {clean_dir}"))
        else:
            groups.append(PairGroup(key, clean, (Sample(variant, variant, path),)))
    return PairSource(label or Path(degraded_dir).name, groups, [], problems)
