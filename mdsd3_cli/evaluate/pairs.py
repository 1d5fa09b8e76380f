"""Where pairs come from: an mdsd3 output's manifests (every shard, finished or partial runs) or two folders
matched by relative path. Pairs are grouped by key, so a clean image is decoded once for all its variants and
repeats."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdsd3_cli.dataset.manifest import record_ratios, run_info
from mdsd3_cli.dataset.names import CLEAN_FOLDER, DEGRADED_FOLDER, MANIFEST_FOLDER, is_generate_output
from mdsd3_cli.dataset.reader import BadLine, ManifestEntry, manifest_entries
from mdsd3_cli.dataset.stored_images import ImageRef
from mdsd3_cli.util.images import walk_images


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
    image: ImageRef
    repeat: int = 1
    ratios: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PairGroup:
    """Every degraded image of one key (all variants and repeats) with their shared clean image."""

    key: str
    clean: ImageRef
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
    if is_generate_output(path):
        return read_manifests(path, label)
    if (path / CLEAN_FOLDER).is_dir() and (path / DEGRADED_FOLDER).is_dir():
        return match_folders(path / CLEAN_FOLDER, path / DEGRADED_FOLDER, label or path.name)
    raise EvaluateError(
        f"{path}: neither an mdsd3 output (no {MANIFEST_FOLDER}/ folder) nor a folder with {CLEAN_FOLDER}/ and "
        f"{DEGRADED_FOLDER}/ subfolders"
    )


def _sample_from_entry(entry: ManifestEntry) -> tuple[ImageRef, Sample] | str:
    """(clean image, sample) of a manifest entry, or the reason it is unusable."""
    record = entry.record
    if entry.clean is None or entry.degraded is None:
        return "an image path leaves the dataset folder"
    repeat, variant = record.get("repeat", 1), record.get("variant", record["folder"])
    if not isinstance(repeat, int) or isinstance(repeat, bool) or not isinstance(variant, str):
        return "'repeat' or 'variant' has the wrong type"
    ratios = record_ratios(record, required=False)
    return entry.clean, Sample(variant, record["folder"], entry.degraded, repeat, ratios)


def read_manifests(root: Path, label: str | None = None) -> PairSource:
    """Every record of every OUT/manifest/*.jsonl (all shards, finished or not; folders or webdataset layout);
    bad lines become problems, a (key, folder) written twice counts once."""
    grouped: dict[str, tuple[ImageRef, dict[str, Sample]]] = {}
    classes: dict[str, None] = {}
    problems: list[Problem] = []

    def bad(line: BadLine) -> None:
        if not line.blank:
            problems.append(Problem(line.where, line.reason))

    def check(record: dict[str, Any]) -> None:
        record_ratios(record, required=False)

    for entry in manifest_entries(root, check=check, bad=bad):
        parsed = _sample_from_entry(entry)
        if isinstance(parsed, str):
            problems.append(Problem(entry.where, parsed))
            continue
        clean, sample = parsed
        classes.update(dict.fromkeys(sample.ratios))
        _, samples = grouped.setdefault(entry.record["key"], (clean, {}))
        samples.setdefault(sample.folder, sample)
    groups = [
        PairGroup(key, clean, tuple(sorted(samples.values(), key=lambda s: (s.variant, s.repeat, s.folder))))
        for key, (clean, samples) in sorted(grouped.items())
    ]
    ordered = [name for name in _run_classes(root) if name in classes]
    return PairSource(label or root.name, groups, ordered + [name for name in classes if name not in ordered], problems)


def _run_classes(root: Path) -> list[str]:
    """The class order of OUT/run.json (manifest ratios are stored sorted); empty when it is unreadable."""
    try:
        classes = run_info(root).get("classes", [])
    except (OSError, ValueError):
        return []
    return [name for name in classes if isinstance(name, str)] if isinstance(classes, list) else []


def _images_under(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative path without extension, file) of every image under `root` (`walk_images`)."""
    for path in walk_images(root):
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
            groups.append(PairGroup(key, ImageRef(clean), (Sample(variant, variant, ImageRef(path)),)))
    return PairSource(label or Path(degraded_dir).name, groups, [], problems)
