"""`mdsd3 export`: a finished dataset (either layout) as WebDataset tars, BasicSR paired LMDB or Parquet.

The manifest is indexed first (a small pointer per pair, sorted by key and variant folder); then the pairs stream
through the format's writer one by one, files read ahead on a few threads and checked against their recorded
SHA-256. The writer builds the destination under a temporary name, so only a finished export ever carries it.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from mdsd3_cli.export.basicsr_lmdb import LmdbWriter
from mdsd3_cli.export.parquet import ParquetWriter
from mdsd3_cli.export.sample import EncodedSample, SampleWriter
from mdsd3_cli.export.webdataset import WebDatasetWriter
from mdsd3_cli.dataset.manifest import TAR_FIELD, ManifestLineError, manifest_files, parse_record, run_folders, run_info
from mdsd3_cli.util.ordered_map import ordered_map
from mdsd3_cli.util.progress import RunProgress
from mdsd3_cli.dataset.stored_images import ImageRef, record_image

ExportFormat = Literal["webdataset", "lmdb", "parquet"]
EXPORT_FORMATS: tuple[str, ...] = ("webdataset", "lmdb", "parquet")
DEFAULT_PER_FILE = 1000
READ_WORKERS = 4


class ExportError(ValueError):
    """The dataset cannot be exported as it is (unfinished, damaged, or not a generate output)."""


@dataclass(frozen=True, order=True)
class _Pointer:
    """Where one pair's record is: sorts by key, then the folder's position in the recipe."""

    key: str
    folder_index: int
    manifest: int
    offset: int


@dataclass
class ExportPlan:
    """A finished dataset (either layout), indexed: its pairs in export order and what the writers need."""

    root: Path
    info: dict[str, Any]
    folders: list[str]
    pairs: list[_Pointer]
    manifests: list[Path]
    bytes_per_database: dict[str | None, tuple[int, int]] = field(default_factory=dict)
    """(total image bytes, images) for the clean images (None) and each variant folder."""

    @property
    def classes(self) -> list[str]:
        return list(self.info.get("classes", []))

    @property
    def meta_info_level(self) -> int:
        """BasicSR meta_info's last field: the PNG compression level, else the JPEG/WebP quality."""
        output = self.info["recipe"]["output"]
        return output["png_compress_level"] if output["format"] == "png" else output["quality"]


@dataclass
class ExportSummary:
    """What one export wrote."""

    to: str
    destination: Path
    pairs: int = 0
    bytes_read: int = 0
    elapsed_s: float = 0.0
    how_to_read: str = ""

    def table(self) -> Table:
        table = Table(title=f"mdsd3 export — {self.to}", show_header=False)
        rate = self.pairs / self.elapsed_s if self.elapsed_s > 0 else 0.0
        for name, value in [("destination", self.destination), ("pairs", self.pairs),
                            ("MiB read", f"{self.bytes_read / 2**20:.1f}"), ("elapsed", f"{self.elapsed_s:.1f} s"),
                            ("pairs/s", f"{rate:.1f}"), ("read it with", self.how_to_read)]:
            table.add_row(name, str(value))
        return table


def plan_export(dataset: str | os.PathLike) -> ExportPlan:
    """Index a finished dataset (folders or webdataset layout); ExportError names what makes it unexportable."""
    root = Path(dataset).expanduser().resolve()
    try:
        info = run_info(root)
        folders = run_folders(info)
    except FileNotFoundError:
        raise ExportError(f"{root}: no run.json; export needs a finished generate output folder") from None
    except (OSError, ValueError) as error:
        raise ExportError(f"{root / 'run.json'}: {error}") from None
    position = {folder: index for index, folder in enumerate(folders)}
    plan = ExportPlan(root, info, folders, [], manifest_files(root))
    sizes: dict[str | None, list[int]] = {folder: [0, 0] for folder in (None, *folders)}
    seen: set[tuple[str, int]] = set()
    for manifest_index, manifest in enumerate(plan.manifests):
        with open(manifest, "rb") as handle:
            offset = 0
            for number, line in enumerate(handle, 1):
                where = f"{manifest}:{number}"
                try:
                    record = parse_record(line)
                except ManifestLineError as error:
                    raise ExportError(f"{where}: {error} (mdsd3 verify lists every problem)") from None
                if record["folder"] not in position:
                    raise ExportError(f"{where}: folder {record['folder']!r} is not one of run.json's {folders}")
                pointer = _Pointer(record["key"], position[record["folder"]], manifest_index, offset)
                offset += len(line)
                if (pointer.key, pointer.folder_index) in seen:
                    continue
                seen.add((pointer.key, pointer.folder_index))
                plan.pairs.append(pointer)
                _count_bytes(sizes[record["folder"]], root, record, "degraded")
                if pointer.folder_index == 0:
                    _count_bytes(sizes[None], root, record, "clean")
    if not plan.pairs:
        raise ExportError(f"{root}: the manifest holds no records")
    plan.pairs.sort()
    keys = len({pair.key for pair in plan.pairs})
    if len(plan.pairs) != keys * len(folders):  # pairs are unique, so every key has every folder
        raise ExportError(f"{root}: unfinished: {keys * len(folders) - len(plan.pairs)} of {keys * len(folders)} "
                          "pairs have no record (finish the run with mdsd3 generate; mdsd3 verify lists them)")
    plan.bytes_per_database = {folder: (size, count) for folder, (size, count) in sizes.items()}
    return plan


def _count_bytes(total: list[int], root: Path, record: dict[str, Any], role: str) -> None:
    size = record.get(f"{role}_bytes")
    if not isinstance(size, int):
        image = _stored(root, record, role)
        try:
            size = len(image.read_bytes()) if image.member else image.path.stat().st_size
        except (OSError, KeyError, tarfile.TarError) as error:
            raise ExportError(f"{image}: {_reason(error)}") from None
    total[0] += size
    total[1] += 1


def open_writer(plan: ExportPlan, to: str, destination: Path, per_file: int) -> SampleWriter:
    """The writer of format `to` (see EXPORT_FORMATS) for `plan`'s dataset."""
    if to == "webdataset":
        return WebDatasetWriter(destination, per_file)
    if to == "lmdb":
        return LmdbWriter(destination, plan.folders, plan.bytes_per_database, plan.meta_info_level)
    if to == "parquet":
        return ParquetWriter(destination, plan.classes, per_file)
    raise ValueError(f"unknown export format {to!r}; expected one of {list(EXPORT_FORMATS)}")


def run_export(dataset: str | os.PathLike, to: str, destination: str | os.PathLike,
               per_file: int = DEFAULT_PER_FILE, console: Console | None = None) -> ExportSummary:
    """Write `dataset` (a finished generate output, either layout) as `to` into the folder `destination`, which
    must not exist."""
    started = time.perf_counter()
    plan = plan_export(dataset)
    destination = Path(destination).expanduser().absolute()
    if destination.resolve().is_relative_to(plan.root):
        raise ExportError(f"{destination} is inside the dataset {plan.root}; export somewhere else")
    summary = ExportSummary(to, destination)
    writer = open_writer(plan, to, destination, per_file)
    try:
        with RunProgress(len(plan.pairs), f"export {to}", unit="pairs", console=console) as progress:
            for sample in ordered_map(_Reader(plan), plan.pairs, READ_WORKERS, name="mdsd3-export"):
                writer.write(sample)
                summary.pairs += 1
                summary.bytes_read += len(sample.clean) + len(sample.degraded)
                progress.advance()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    summary.how_to_read = _how_to_read(to, destination, writer)
    summary.elapsed_s = time.perf_counter() - started
    return summary


class _Reader:
    """Reads one pair: its record (from the manifest, by offset) and both images, checked against the record."""

    def __init__(self, plan: ExportPlan) -> None:
        self.plan = plan

    def __call__(self, pointer: _Pointer) -> EncodedSample:
        manifest = self.plan.manifests[pointer.manifest]
        with open(manifest, "rb") as handle:
            handle.seek(pointer.offset)
            record = parse_record(handle.readline())
        clean, degraded = (_stored(self.plan.root, record, role) for role in ("clean", "degraded"))
        return EncodedSample(record, self._read(clean, record, "clean"), self._read(degraded, record, "degraded"),
                             Path(clean.name).suffix.lstrip("."))

    @staticmethod
    def _read(image: ImageRef, record: dict[str, Any], role: str) -> bytes:
        try:
            data = image.read_bytes()
        except (OSError, KeyError, tarfile.TarError) as error:
            raise ExportError(f"{image}: {_reason(error)} (mdsd3 verify lists every problem)") from None
        expected = record.get(f"{role}_sha256")
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise ExportError(f"{image}: SHA-256 differs from the manifest (mdsd3 verify lists every problem)")
        return data


def _stored(root: Path, record: dict[str, Any], role: str) -> ImageRef:
    """Where a record's image is (file or tar member); ExportError when its path leaves the dataset."""
    image = record_image(root, record, role)
    if image is None:
        raise ExportError(f"the {role} image of key {record['key']!r} ({record.get(TAR_FIELD, record.get(role))!r}) is "
                          "outside the dataset")
    return image


def _reason(error: BaseException) -> str:
    if isinstance(error, KeyError):
        return "not in its tar"
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def _how_to_read(to: str, destination: Path, writer: SampleWriter) -> str:
    if isinstance(writer, WebDatasetWriter):
        return f'webdataset.WebDataset("{writer.pattern()}")'
    if to == "lmdb":
        return f"BasicSR PairedImageDataset, io_backend type lmdb: dataroot_gt {destination}/gt.lmdb"
    return f'datasets.load_dataset("parquet", data_dir="{destination}")'

