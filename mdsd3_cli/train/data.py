"""Training data: pair discovery per dataset kind, loading and augmentation, and deterministic sampling.

Sampling is a pure function of (data.seed, step, slot): slot `b` of rank `r` is global slot
`r * batch_size + b`; the draw picks the dataset (by weight), the pair, identity, flip and crop. A pair
that cannot be used (unreadable, clean/degraded sizes differ) is skipped by drawing again with the next
attempt number, so a resumed run sees exactly what an uninterrupted run would have seen, whatever the
number of loader workers. With gradient accumulation, use data step `optimizer_step * grad_accum + micro`.

Every sample names its images by key (`clean_key`, `degraded_key`: one per image file and flip). With
`batches(..., decode_once=True)` (the trainer with `data.cache_latents`, fixed crops) each loader process decodes
an image and flip once: a later sample of it carries placeholder pixels (`clean_decoded`/`degraded_decoded` False)
for a consumer that keeps latents by key (`train.step.LatentEncoder`). A loader process then reads a file once per
flip (and once more for a pair of mismatched sizes that it is found in): a change to it during the run is not seen.
"""

from __future__ import annotations

import csv
import json
import re
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mdsd3_cli.dataset.manifest import record_ratios
from mdsd3_cli.dataset.reader import BadLine, manifest_entries
from mdsd3_cli.dataset.stored_images import ImageRef
from mdsd3_cli.model.heads import UnknownClassError, check_ratios, prompt_for, ratio_vector
from mdsd3_cli.recipe.train import (
    DataSection,
    DatasetSpec,
    Mdsd3OutputDataset,
    PairedFoldersDataset,
    PairListDataset,
    TrainRecipe,
)
from mdsd3_cli.util.images import ImageError, walk_images

MAX_DRAW_ATTEMPTS = 64
_SAMPLE_STREAM = 0x5A3D
_DROP_STREAM = 0xD20B

UNMATCHED = "unmatched"
DUPLICATE_CLEAN = "duplicate_clean"
MISSING_FILE = "missing_file"
BAD_RECORD = "bad_record"
UNKNOWN_CLASS = "unknown_class"
UNREADABLE = "unreadable"
SIZE_MISMATCH = "size_mismatch"


class DatasetError(ValueError):
    """Training data that cannot be used; raised before training starts."""


class EmptyDatasetError(DatasetError):
    """A dataset of the recipe yields no pairs."""


@dataclass(frozen=True)
class Pair:
    """One training pair; `ratios` maps class names to ratios."""

    clean: ImageRef
    degraded: ImageRef
    ratios: Mapping[str, float]
    dataset: str


@dataclass(frozen=True)
class Skip:
    """Something left out: a file or record at discovery, or a pair that failed to load."""

    reason: str
    dataset: str
    detail: str


class DataReport:
    """Skips by reason; each distinct item counts once however often it is drawn."""

    def __init__(self) -> None:
        self._items: dict[str, dict[Skip, int]] = {}

    def add(self, skip: Skip) -> None:
        """Record one occurrence of a skip."""
        items = self._items.setdefault(skip.reason, {})
        items[skip] = items.get(skip, 0) + 1

    def counts(self, dataset: str | None = None) -> dict[str, int]:
        """Distinct skipped items per reason (optionally for one dataset)."""
        counts = {
            reason: sum(1 for skip in items if dataset in (None, skip.dataset)) for reason, items in self._items.items()
        }
        return {reason: count for reason, count in counts.items() if count}

    def draws_skipped(self) -> int:
        """How many sample draws were replaced because their pair failed to load."""
        return sum(sum(self._items.get(reason, {}).values()) for reason in (UNREADABLE, SIZE_MISMATCH))

    def examples(self, reason: str, dataset: str | None = None, limit: int = 3) -> list[str]:
        """The first few skipped items of a reason, as text."""
        details = [skip.detail for skip in self._items.get(reason, {}) if dataset in (None, skip.dataset)]
        return details[:limit]

    def lines(self, dataset: str | None = None) -> list[str]:
        """One line per reason: count and first examples."""
        return [
            f"{reason}: {count} (e.g. {'; '.join(self.examples(reason, dataset))})"
            for reason, count in sorted(self.counts(dataset).items())
        ]


# ---------------------------------------------------------------- discovery


def _key(path: Path, root: Path) -> str:
    """Relative path without extension, `/`-separated."""
    return path.relative_to(root).with_suffix("").as_posix()


def _paired_folders(spec: PairedFoldersDataset, classes: Sequence[str], report: DataReport) -> list[Pair]:
    """Pairs matched by relative path; the ratios are the dataset's own `classes`."""
    clean_by_key: dict[str, Path] = {}
    for path in walk_images(spec.clean):
        key = _key(path, spec.clean)
        if key in clean_by_key:
            report.add(Skip(DUPLICATE_CLEAN, spec.name, f"{path} (kept {clean_by_key[key]})"))
        else:
            clean_by_key[key] = path
    ratios = dict(spec.classes)
    pattern = None if spec.match is None else re.compile(spec.match)
    pairs = []
    for path in walk_images(spec.degraded):
        key = _key(path, spec.degraded)
        if pattern is not None:
            found = pattern.fullmatch(key)
            if found is None:
                report.add(Skip(UNMATCHED, spec.name, f"{path}: name does not match {spec.match!r}"))
                continue
            key = found.group("stem")
        clean = clean_by_key.get(key)
        if clean is None:
            report.add(Skip(UNMATCHED, spec.name, f"{path}: no clean image {key}.* in {spec.clean}"))
            continue
        pairs.append(Pair(ImageRef(clean), ImageRef(path), ratios, spec.name))
    return pairs


def _parse_classes(value: Any, classes: Sequence[str], where: str) -> dict[str, float]:
    """Class tags from a list row: a mapping, a list of names, or text like `rain haze:0.4` (`+`/`;` also separate)."""
    if value is None or value == "":
        return {}
    try:
        if isinstance(value, Mapping):
            ratios = {str(name): float(ratio) for name, ratio in value.items()}
        elif isinstance(value, list):
            ratios = {str(name): 1.0 for name in value}
        elif isinstance(value, str):
            ratios = {}
            for token in value.replace("+", " ").replace(";", " ").split():
                name, _, ratio = token.replace("=", ":").partition(":")
                ratios[name] = float(ratio) if ratio else 1.0
        else:
            raise ValueError(f"classes must be a mapping, a list or text, not {value!r}")
        check_ratios(ratios, classes)
    except (UnknownClassError, ValueError, TypeError) as error:
        raise DatasetError(f"{where}: classes: {error}") from error
    return ratios


def _list_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`FILE:LINE`, row) for each row of a CSV (with header) or JSONL pair list."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = {"clean", "degraded"} - set(reader.fieldnames or ())
            if missing:
                raise DatasetError(
                    f"{path}:1: the header needs columns clean,degraded[,classes]; missing {sorted(missing)}"
                )
            for row in reader:
                yield f"{path}:{reader.line_num}", row
        return
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(f"{where}: invalid JSON: {error}") from error
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: each line must be an object with clean, degraded[, classes]")
            yield where, row


def _pair_list(spec: PairListDataset, classes: Sequence[str], report: DataReport) -> list[Pair]:
    pairs = []
    for where, row in _list_rows(spec.list):
        if not row.get("clean") or not row.get("degraded"):
            raise DatasetError(f"{where}: clean and degraded paths are required")
        ratios = _parse_classes(row.get("classes"), classes, where) or dict(spec.classes)
        if not ratios:
            raise DatasetError(f"{where}: no classes for this pair (give a classes column or the dataset's classes)")
        clean, degraded = (spec.list.parent / Path(row[side]).expanduser() for side in ("clean", "degraded"))
        missing = [str(path) for path in (clean, degraded) if not path.is_file()]
        if missing:
            report.add(Skip(MISSING_FILE, spec.name, f"{where}: not found: {', '.join(missing)}"))
            continue
        pairs.append(Pair(ImageRef(clean), ImageRef(degraded), ratios, spec.name))
    return pairs


def _mdsd3_output(spec: Mdsd3OutputDataset, classes: Sequence[str], report: DataReport) -> list[Pair]:
    """Pairs from the manifest records of a generate output (either layout: files, or tar members), with their
    requested ratios; paths relative to `dir` and never outside it."""
    pairs, seen = [], set()

    def bad(line: BadLine) -> None:
        if not line.blank:
            report.add(Skip(BAD_RECORD, spec.name, f"{line.where}: {line.reason}"))

    for entry in manifest_entries(spec.dir, check=record_ratios, bad=bad):
        clean, degraded, where = entry.clean, entry.degraded, entry.where
        if clean is None or degraded is None:
            report.add(Skip(BAD_RECORD, spec.name, f"{where}: an image path leaves {spec.dir}"))
            continue
        ratios = record_ratios(entry.record)
        unknown = sorted(name for name, ratio in ratios.items() if name not in classes and ratio > 0)
        if unknown:
            report.add(Skip(UNKNOWN_CLASS, spec.name, f"{where}: classes {unknown} are not in the recipe"))
            continue
        ratios = {name: ratio for name, ratio in ratios.items() if name in classes}
        try:
            check_ratios(ratios, classes)
        except ValueError as error:
            report.add(Skip(BAD_RECORD, spec.name, f"{where}: {error}"))
            continue
        missing = [str(image) for image in (clean, degraded) if not image.exists()]
        if missing:
            report.add(Skip(MISSING_FILE, spec.name, f"{where}: not found: {', '.join(missing)}"))
        elif (clean, degraded) not in seen:
            seen.add((clean, degraded))
            pairs.append(Pair(clean, degraded, ratios, spec.name))
    return pairs


DATASET_DISCOVERY: dict[str, Callable[[Any, Sequence[str], DataReport], list[Pair]]] = {
    "paired_folders": _paired_folders,
    "pair_list": _pair_list,
    "mdsd3_output": _mdsd3_output,
}
"""A dataset kind (its recipe section's `kind`) -> its discovery function: (spec, the recipe's classes, report) ->
pairs."""


def discover_pairs(spec: DatasetSpec, classes: Sequence[str], report: DataReport) -> list[Pair]:
    """All pairs of one dataset; unusable files and records go to `report`, malformed lists raise `DatasetError`."""
    return DATASET_DISCOVERY[spec.kind](spec, classes, report)


def describe_source(spec: DatasetSpec) -> str:
    """Where a dataset's files come from, for messages."""
    if isinstance(spec, PairedFoldersDataset):
        return f"clean={spec.clean} degraded={spec.degraded}" + (f" match={spec.match!r}" if spec.match else "")
    if isinstance(spec, PairListDataset):
        return f"list={spec.list}"
    return f"dir={spec.dir}"


# ---------------------------------------------------------------- loading


class _PairSkipped(Exception):
    def __init__(self, skip: Skip) -> None:
        super().__init__(skip.detail)
        self.skip = skip


def _open_rgb(source: ImageRef, dataset: str) -> Image.Image:
    """Decode a whole image as RGB through the readers' one decoding path (`ImageRef.read_rgb`); failure raises
    `_PairSkipped(UNREADABLE)`."""
    try:
        return source.read_rgb()
    except ImageError as error:
        raise _PairSkipped(Skip(UNREADABLE, dataset, f"{source}: {error.reason}")) from None


def _resized_size(width: int, height: int, resolution: int, resize: str) -> tuple[int, int]:
    """Size before cropping: short side = resolution (`native`: only when smaller)."""
    short = min(width, height)
    if short == resolution or (resize == "native" and short > resolution):
        return width, height
    scale = resolution / short
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class Draw:
    """What one sample slot uses: a pair (global index), identity, flip and the crop position (fractions)."""

    pair_index: int
    identity: bool
    flip: bool
    crop_x: float
    crop_y: float


@dataclass
class Decoded:
    """What one loader process decoded (`PairedDataset.batches(decode_once=True)`): each image file's size, and
    the image keys whose pixels it sent."""

    sizes: dict[ImageRef, tuple[int, int]] = field(default_factory=dict)
    sent: set[int] = field(default_factory=set)


class PairedDataset(Dataset):
    """Pairs of all datasets, sampled deterministically by (seed, step, slot); see the module docstring.

    `dataset[(step, slot)]` is one sample: `clean`, `degraded` [3,R,R] in [-1,1], `ratios` [K] in class
    order, `identity` (bool). `batches()` runs a DataLoader over steps and keeps `report` up to date.
    """

    def __init__(
        self,
        groups: Sequence[tuple[DatasetSpec, list[Pair]]],
        classes: Sequence[str],
        data: DataSection,
        report: DataReport | None = None,
    ) -> None:
        self.classes = list(classes)
        self.data = data
        self.report = report if report is not None else DataReport()
        empty = [spec.name for spec, pairs in groups if not pairs]
        if not groups or empty:
            raise EmptyDatasetError(f"datasets without pairs: {empty or 'none given'}")
        self.specs = [spec for spec, _ in groups]
        self.pairs = [pair for _, pairs in groups for pair in pairs]
        self._offsets = np.cumsum([0] + [len(pairs) for _, pairs in groups]).tolist()
        self._cumulative_weights = np.cumsum([spec.weight for spec in self.specs]).tolist()
        self._ratio_rows = torch.tensor([ratio_vector(pair.ratios, self.classes) for pair in self.pairs])
        self._image_index: dict[ImageRef, int] = {}
        for pair in self.pairs:
            for image in (pair.clean, pair.degraded):
                self._image_index.setdefault(image, len(self._image_index))

    def draw(self, step: int, slot: int, attempt: int = 0) -> Draw:
        """The draw of a global slot at a data step; a pure function of (seed, step, slot, attempt)."""
        u = np.random.default_rng([self.data.seed, _SAMPLE_STREAM, step, slot, attempt]).random(6)
        total = self._cumulative_weights[-1]
        group = min(bisect_right(self._cumulative_weights, u[0] * total), len(self.specs) - 1)
        size = self._offsets[group + 1] - self._offsets[group]
        return Draw(
            pair_index=self._offsets[group] + min(int(u[1] * size), size - 1),
            identity=bool(u[2] < self.data.identity_fraction),
            flip=self.data.random_flip and bool(u[3] < 0.5),
            crop_x=float(u[4]) if self.data.random_crop else 0.5,
            crop_y=float(u[5]) if self.data.random_crop else 0.5,
        )

    def image_keys(self, draw: Draw) -> tuple[int, int]:
        """(clean key, degraded key) of a draw: one integer per image file and flip (identity: the clean twice)."""
        pair = self.pairs[draw.pair_index]
        clean = 2 * self._image_index[pair.clean] + draw.flip
        return clean, clean if draw.identity else 2 * self._image_index[pair.degraded] + draw.flip

    def load(self, draw: Draw, decoded: Decoded | None = None) -> dict[str, torch.Tensor]:
        """Decode, resize, crop and flip one draw; an unusable pair raises `_PairSkipped`.

        `decoded`: what this loader process decoded before. An image whose key it already sent is not decoded
        again (placeholder pixels, `clean_decoded`/`degraded_decoded` False), and a pair of known sizes that differ
        is skipped undecoded.
        """
        pair = self.pairs[draw.pair_index]
        keys = self.image_keys(draw)
        refs = (pair.clean, pair.clean if draw.identity else pair.degraded)
        if decoded is not None and all(ref in decoded.sizes for ref in refs):
            self._check_sizes(pair, *(decoded.sizes[ref] for ref in refs))
        opened: dict[ImageRef, Image.Image] = {}
        for ref, key in zip(refs, keys):
            if ref not in opened and (decoded is None or key not in decoded.sent):
                opened[ref] = _open_rgb(ref, pair.dataset)
                if decoded is not None:
                    decoded.sizes[ref] = opened[ref].size
        sizes = [opened[ref].size if ref in opened else decoded.sizes[ref] for ref in refs]
        self._check_sizes(pair, *sizes)
        resolution = self.data.resolution
        width, height = _resized_size(*sizes[0], resolution, self.data.resize)
        left, top = round(draw.crop_x * (width - resolution)), round(draw.crop_y * (height - resolution))
        box = (left, top, left + resolution, top + resolution)
        tensors = {}
        for ref, image in opened.items():
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=3.0)
            image = image.crop(box)
            tensors[ref] = _to_tensor(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if draw.flip else image)
        if decoded is not None:
            decoded.sent.update(key for ref, key in zip(refs, keys) if ref in opened)
        placeholder = None if all(ref in tensors for ref in refs) else torch.zeros(3, resolution, resolution)
        clean, degraded = (tensors.get(ref, placeholder) for ref in refs)
        if draw.identity and refs[0] in tensors:
            degraded = degraded.clone()
        return {
            "clean": clean,
            "degraded": degraded,
            "ratios": torch.zeros(len(self.classes)) if draw.identity else self._ratio_rows[draw.pair_index].clone(),
            "identity": torch.tensor(draw.identity),
            "clean_key": torch.tensor(keys[0]),
            "degraded_key": torch.tensor(keys[1]),
            "clean_decoded": torch.tensor(refs[0] in opened),
            "degraded_decoded": torch.tensor(refs[1] in opened),
        }

    @staticmethod
    def _check_sizes(pair: Pair, clean: tuple[int, int], degraded: tuple[int, int]) -> None:
        """`_PairSkipped(SIZE_MISMATCH)` when the pair's images differ in size."""
        if clean != degraded:
            detail = f"{pair.clean} is {clean[0]}x{clean[1]} but {pair.degraded} is {degraded[0]}x{degraded[1]}"
            raise _PairSkipped(Skip(SIZE_MISMATCH, pair.dataset, detail))

    def sample(
        self, step: int, slot: int, decoded: Decoded | None = None
    ) -> tuple[dict[str, torch.Tensor], list[Skip]]:
        """The sample of a global slot, and the pairs skipped on the way (no side effects but on `decoded`, see `load`)."""
        skips = []
        for attempt in range(MAX_DRAW_ATTEMPTS):
            try:
                return self.load(self.draw(step, slot, attempt), decoded), skips
            except _PairSkipped as skipped:
                skips.append(skipped.skip)
        reasons = "; ".join(skip.detail for skip in skips[:3])
        raise DatasetError(f"no usable pair in {MAX_DRAW_ATTEMPTS} draws at step {step}, slot {slot} (e.g. {reasons})")

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        step, slot = key
        sample, skips = self.sample(step, slot)
        self._record(skips)
        return sample

    def batch(
        self,
        step: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        decoded: Decoded | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[Skip]]:
        """This rank's batch at a data step, and the skips on the way (no side effects but on `decoded`, see `load`)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        samples, skips = [], []
        for slot in range(rank * batch_size, (rank + 1) * batch_size):
            sample, sample_skips = self.sample(step, slot, decoded)
            samples.append(sample)
            skips.extend(sample_skips)
        return {name: torch.stack([sample[name] for sample in samples]) for name in samples[0]}, skips

    def sample_batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """This rank's batch at a data step: `clean`, `degraded` [B,3,R,R], `ratios` [B,K], `identity` [B] bool,
        `clean_key`, `degraded_key` [B] int64, `clean_decoded`, `degraded_decoded` [B] bool (True here, see the
        module docstring)."""
        batch, skips = self.batch(step, batch_size, rank, world_size)
        self._record(skips)
        return batch

    def batches(
        self,
        start_step: int,
        end_step: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int | None = None,
        pin_memory: bool = False,
        decode_once: bool = False,
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(step, batch) for data steps start_step..end_step-1, built by `workers` loader processes, in order.
        `decode_once`: each loader process decodes an image and flip once (see the module docstring); it needs
        fixed crops (`data.random_crop: false`), as a key names a file and a flip, not a crop."""
        if decode_once and self.data.random_crop:
            raise ValueError("decode_once needs data.random_crop: false (a key names a file and a flip, not a crop)")
        loader = DataLoader(
            _StepBatches(self, batch_size, rank, world_size, Decoded() if decode_once else None),
            sampler=range(start_step, end_step),
            batch_size=None,
            num_workers=self.data.workers if workers is None else workers,
            pin_memory=pin_memory,
        )
        for step, (batch, skips) in zip(range(start_step, end_step), loader):
            self._record(skips)
            yield step, batch

    def _record(self, skips: Sequence[Skip]) -> None:
        for skip in skips:
            self.report.add(skip)

    def summary(self) -> str:
        """Pairs per dataset and skips by reason, for logs."""
        lines = []
        for index, spec in enumerate(self.specs):
            count = self._offsets[index + 1] - self._offsets[index]
            lines.append(f"{spec.name}: {count} pairs, weight {spec.weight:g} ({describe_source(spec)})")
            lines.extend(f"  {line}" for line in self.report.lines(spec.name))
        return "\n".join(lines)


class _StepBatches(Dataset):
    """DataLoader view: index = data step, item = (batch, skips) of one rank. `decoded` (None: decode every
    sample) is this loader process's own record of what it decoded: each worker process gets its own copy."""

    def __init__(
        self,
        dataset: PairedDataset,
        batch_size: int,
        rank: int,
        world_size: int,
        decoded: Decoded | None,
    ) -> None:
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.decoded = decoded

    def __getitem__(self, step: int) -> tuple[dict[str, torch.Tensor], list[Skip]]:
        return self.dataset.batch(step, self.batch_size, self.rank, self.world_size, self.decoded)


def build_dataset(recipe: TrainRecipe) -> PairedDataset:
    """Discover every dataset's pairs; a dataset with no pairs raises `EmptyDatasetError` naming its sources."""
    report = DataReport()
    groups = [(spec, discover_pairs(spec, recipe.classes, report)) for spec in recipe.datasets]
    empty = [(index, spec) for index, (spec, pairs) in enumerate(groups) if not pairs]
    if empty:
        lines = [
            f"{recipe.source}: datasets.{index}: dataset {spec.name!r} ({spec.kind}: {describe_source(spec)}) "
            "has no pairs"
            for index, spec in empty
        ]
        lines += [f"  {line}" for _, spec in empty for line in report.lines(spec.name)]
        raise EmptyDatasetError("\n".join(lines))
    return PairedDataset(groups, recipe.classes, recipe.data, report)


def condition_drop_mask(seed: int, step: int, batch_size: int, p: float, rank: int = 0) -> torch.Tensor:
    """[B] bool: which of this rank's slots drop their condition (prompt "" and zero mask) at a data step."""
    slots = range(rank * batch_size, (rank + 1) * batch_size)
    return torch.tensor(
        [bool(np.random.default_rng([seed, _DROP_STREAM, step, slot]).random() < p) for slot in slots], dtype=torch.bool
    )


def batch_prompts(ratios: torch.Tensor, classes: Sequence[str]) -> list[str]:
    """The prompt of each row of a [B, K] ratio tensor (identity rows: "clean")."""
    return [prompt_for(dict(zip(classes, row)), classes) for row in ratios.tolist()]
