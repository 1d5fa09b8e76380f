"""`mdsd3 export`: a finished dataset (either layout) as WebDataset tars, BasicSR paired LMDB or Parquet.

The manifest is indexed first (a small pointer per pair, sorted by key and variant folder; every record's fields
checked); then the pairs stream through the format's writer one by one, files read ahead on a few threads, checked
against their recorded SHA-256 and their image header (size against the record and Pillow's MAX_IMAGE_PIXELS). The
writer builds the destination in a private staging folder, one export per destination, so only a finished export
ever carries it.
A run that is not complete (`dataset.completeness`: a live generate, a shard unfinished or never run; or a key
without every variant) is refused unless `partial` is asked for; a partial export says so in its output
(docs/export.md). Each record is read again when its pair is written and must be the line indexed (key, folder
and the line's hash): a manifest changed during the export stops it, with nothing published.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image
from rich.console import Console
from rich.table import Table

from mdsd3_cli.dataset.completeness import completeness
from mdsd3_cli.dataset.manifest import MAX_LINE_BYTES, TAR_FIELD, number_problem, parse_record, run_folders, run_info
from mdsd3_cli.dataset.names import MANIFEST_SUFFIX, RUN_JSON
from mdsd3_cli.dataset.reader import BadLine, manifest_entries, manifest_files
from mdsd3_cli.dataset.stored_images import ImageRef, record_image
from mdsd3_cli.dataset.tar_format import EncodedSample, flat_key
from mdsd3_cli.export.basicsr_lmdb import MAX_KEY_BYTES
from mdsd3_cli.export.formats import EXPORT_FORMATS
from mdsd3_cli.export.parquet import SCALAR_FIELDS
from mdsd3_cli.export.sample import ExportTarget, SampleWriter
from mdsd3_cli.util.ordered_map import ordered_map
from mdsd3_cli.util.progress import RunProgress
from mdsd3_cli.util.safe_names import safe_component

READ_WORKERS = 4
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
"""Image file extensions export takes, and the Pillow decoder each must decode with."""
_INT_RANGES = {pa.int32(): 2**31, pa.int64(): 2**63}
MAX_RECORDED_BYTES = 2**40
"""A record's `<role>_bytes` above this (or negative) is not trusted for sizing; the file is measured instead."""


class ExportError(ValueError):
    """The dataset cannot be exported as it is (unfinished, damaged, or not a generate output)."""


@dataclass(frozen=True, order=True)
class _Pointer:
    """Where one pair's record is: sorts by key, then the folder's position in the recipe."""

    key: str
    folder_index: int
    manifest: int
    offset: int
    line_hash: bytes
    """BLAKE2b (16 bytes) of the record's line: the line read again must be this one."""


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
    unfinished: list[str] = field(default_factory=list)
    """Why the run is not complete (empty: complete); only a `partial` plan has any."""
    keys_left_out: int = 0
    """Keys without a record for every variant folder (left out of a partial export)."""

    @property
    def partial_note(self) -> dict[str, Any] | None:
        """What a partial export records in its output, or None for a complete run."""
        if not self.unfinished:
            return None
        return {
            "partial": True,
            "dataset": str(self.root),
            "why": self.unfinished,
            "pairs": len(self.pairs),
            "keys_left_out": self.keys_left_out,
        }

    @property
    def classes(self) -> list[str]:
        return list(self.info.get("classes", []))


@dataclass
class ExportSummary:
    """What one export wrote."""

    to: str
    destination: Path
    pairs: int = 0
    bytes_read: int = 0
    elapsed_s: float = 0.0
    how_to_read: str = ""
    partial: list[str] = field(default_factory=list)
    """Why the exported run was not complete (empty: it was)."""
    keys_left_out: int = 0

    def table(self) -> Table:
        table = Table(title=f"mdsd3 export — {self.to}", show_header=False)
        rate = self.pairs / self.elapsed_s if self.elapsed_s > 0 else 0.0
        rows = [("destination", self.destination), ("pairs", self.pairs)]
        if self.partial:
            rows.append(("PARTIAL", f"{'; '.join(self.partial)}; {self.keys_left_out} keys left out"))
        rows += [
            ("MiB read", f"{self.bytes_read / 2**20:.1f}"),
            ("elapsed", f"{self.elapsed_s:.1f} s"),
            ("pairs/s", f"{rate:.1f}"),
            ("read it with", self.how_to_read),
        ]
        for name, value in rows:
            table.add_row(name, str(value))
        return table


def plan_export(dataset: str | os.PathLike, partial: bool = False) -> ExportPlan:
    """Index a finished dataset (folders or webdataset layout); ExportError names what makes it unexportable.

    A run that is not complete is refused unless `partial`: then keys lacking a variant folder are left out and
    the plan says why it is partial (`unfinished`, `keys_left_out`).
    """
    root = Path(dataset).expanduser().resolve()
    try:
        info = run_info(root)
        folders = [safe_component(folder, "variant folder") for folder in run_folders(info)]
        _check_classes(info.get("classes", []))
    except FileNotFoundError:
        raise ExportError(f"{root}: no {RUN_JSON}; export needs a finished generate output folder") from None
    except (OSError, ValueError) as error:
        raise ExportError(f"{root / RUN_JSON}: {error}") from None
    if len(set(folders)) != len(folders):
        raise ExportError(f"{root / RUN_JSON}: variant folders repeat: {folders}")
    position = {folder: index for index, folder in enumerate(folders)}
    plan = ExportPlan(root, info, folders, [], manifest_files(root))
    sizes: dict[str | None, list[int]] = {folder: [0, 0] for folder in (None, *folders)}
    seen: set[tuple[str, int]] = set()
    torn: list[str] = []
    manifest_index = {manifest: index for index, manifest in enumerate(plan.manifests)}
    own: dict[Path, set[tuple[str, int]]] = {manifest: set() for manifest in plan.manifests}

    def refuse(bad: BadLine) -> None:
        if bad.unfinished:  # being appended, or a killed run's: not a record yet
            torn.append(f"{bad.manifest.name} ends in an unfinished line")
        else:
            raise ExportError(f"{bad.where}: {bad.reason} (mdsd3 verify lists every problem)")

    for entry in manifest_entries(root, plan.manifests, bad=refuse):
        record = entry.record
        if record["folder"] not in position:
            raise ExportError(f"{entry.where}: folder {record['folder']!r} is not one of run.json's {folders}")
        problem = record_problem(record)
        if problem is not None:
            raise ExportError(f"{entry.where}: {problem} (mdsd3 verify lists every problem)")
        pointer = _Pointer(
            record["key"],
            position[record["folder"]],
            manifest_index[entry.manifest],
            entry.offset,
            _line_hash(entry.line),
        )
        own[entry.manifest].add((pointer.key, pointer.folder_index))
        if (pointer.key, pointer.folder_index) in seen:
            continue
        seen.add((pointer.key, pointer.folder_index))
        plan.pairs.append(pointer)
        _count_bytes(sizes[record["folder"]], root, record, "degraded")
        if pointer.folder_index == 0:
            _count_bytes(sizes[None], root, record, "clean")
    recorded = {manifest.name.removesuffix(MANIFEST_SUFFIX): len(samples) for manifest, samples in own.items()}
    plan.unfinished = completeness(root, recorded, len(seen)).unfinished + torn
    plan.pairs.sort()
    per_key = Counter(pair.key for pair in plan.pairs)  # pairs are unique, so a full count is every folder
    if len(plan.pairs) != len(per_key) * len(folders):
        plan.unfinished.append(
            f"{len(per_key) * len(folders) - len(plan.pairs)} of {len(per_key) * len(folders)} "
            "pairs have no record (mdsd3 verify lists them)"
        )
        plan.keys_left_out = sum(count != len(folders) for count in per_key.values())
        plan.pairs = [pair for pair in plan.pairs if per_key[pair.key] == len(folders)]
    if plan.unfinished and not partial:
        raise ExportError(
            f"{root}: unfinished: {'; '.join(plan.unfinished)}. Finish the run with mdsd3 generate, "
            "or pass --partial to export the complete keys and mark the output partial"
        )
    if not plan.pairs:
        raise ExportError(f"{root}: the manifest holds no {'complete key' if per_key else 'records'}")
    plan.bytes_per_database = {folder: (size, count) for folder, (size, count) in sizes.items()}
    return plan


def _check_classes(classes: Any) -> None:
    if (
        not isinstance(classes, list)
        or not all(isinstance(name, str) for name in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ValueError(f"classes must be a list of distinct names, got {classes!r}")


def record_problem(record: dict[str, Any]) -> str | None:
    """What makes a parsed manifest record unusable for export (the field and why), or None."""
    problem = number_problem(record)
    if problem is not None:
        return problem
    if not record["key"] or len(flat_key(record["key"]).encode("ascii")) > MAX_KEY_BYTES:
        return f"field 'key' must be 1 to {MAX_KEY_BYTES} bytes once escaped (an LMDB key), got {record['key']!r}"
    size = record.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(side) and side >= 1 for side in size)):
        return f"field 'size' must be [width, height] (two positive integers), got {size!r}"
    ratios = record.get("ratios")
    if not (isinstance(ratios, dict) and all(_is_number(value) for value in ratios.values())):
        return f"field 'ratios' must map class names to numbers, got {ratios!r}"
    for name, kind, _ in SCALAR_FIELDS:
        value = record.get(name)
        if value is None:
            continue
        if pa.types.is_string(kind):
            fits = isinstance(value, str)
        elif pa.types.is_integer(kind):
            fits = _is_int(value) and -_INT_RANGES[kind] <= value < _INT_RANGES[kind]
        else:
            fits = _is_number(value)
        if not fits:
            return f"field {name!r} must be {kind}, got {value!r}"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count_bytes(total: list[int], root: Path, record: dict[str, Any], role: str) -> None:
    size = record.get(f"{role}_bytes")
    if not (_is_int(size) and 0 <= size < MAX_RECORDED_BYTES):  # the reader checks a recorded size
        image = _stored(root, record, role)
        try:
            size = len(image.read_bytes()) if image.member else image.path.stat().st_size
        except (OSError, KeyError, tarfile.TarError) as error:
            raise ExportError(f"{image}: {_reason(error)}") from None
    total[0] += size
    total[1] += 1


def open_writer(
    plan: ExportPlan, to: str, destination: Path, per_file: int | None = None, one_lq: bool = False
) -> SampleWriter:
    """The writer of format `to` (an EXPORT_FORMATS name) for `plan`'s dataset (marked partial when the plan is);
    `one_lq`: lmdb with one LQ database for every variant folder."""
    if one_lq and to != "lmdb":
        raise ValueError(f"one LQ database is an lmdb layout; --to {to} has no LQ databases")
    if to not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {to!r}; expected one of {list(EXPORT_FORMATS)}")
    target = ExportTarget(
        destination=destination,
        folders=plan.folders,
        classes=plan.classes,
        bytes_per_database=plan.bytes_per_database,
        run_info=plan.info,
        partial=plan.partial_note,
        per_file=per_file,
        one_lq=one_lq,
    )
    return EXPORT_FORMATS[to](target)


def run_export(
    dataset: str | os.PathLike,
    to: str,
    destination: str | os.PathLike,
    per_file: int | None = None,
    console: Console | None = None,
    partial: bool = False,
    one_lq: bool = False,
) -> ExportSummary:
    """Write `dataset` (a finished generate output, either layout) as `to` into the folder `destination`, which
    must not exist. `partial`: export an unfinished run's complete keys, marked partial (see `plan_export`).
    `one_lq`: lmdb with one LQ database for every variant folder (`basicsr_lmdb`)."""
    started = time.perf_counter()
    plan = plan_export(dataset, partial)
    destination = Path(destination).expanduser().absolute()
    if destination.resolve().is_relative_to(plan.root):
        raise ExportError(f"{destination} is inside the dataset {plan.root}; export somewhere else")
    summary = ExportSummary(to, destination, partial=plan.unfinished, keys_left_out=plan.keys_left_out)
    writer = open_writer(plan, to, destination, per_file, one_lq)
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
    summary.how_to_read = writer.how_to_read()
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
            line = handle.readline(MAX_LINE_BYTES + 1)  # an indexed line is at most MAX_LINE_BYTES
        if _line_hash(line) != pointer.line_hash:  # key, folder and every field: the line indexed, byte for byte
            folder = self.plan.folders[pointer.folder_index]
            raise ExportError(
                f"{manifest}: the record of key {pointer.key!r} folder {folder!r} is no longer at "
                "its indexed place: the dataset changed during the export (is a generate writing "
                "it?); nothing was published"
            )
        record = parse_record(line)  # the line indexed, so it parses and passed record_problem
        clean, degraded = (_stored(self.plan.root, record, role) for role in ("clean", "degraded"))
        extension = Path(clean.name).suffix.lstrip(".").lower()
        if extension not in PIL_FORMATS or Path(degraded.name).suffix.lstrip(".").lower() != extension:
            raise ExportError(
                f"{manifest}: key {record['key']!r}: image files {clean.name!r} and {degraded.name!r} "
                f"must both end in one of .{', .'.join(PIL_FORMATS)}"
            )
        clean_bytes, clean_shape = self._read(clean, record, "clean", extension)
        degraded_bytes, degraded_shape = self._read(degraded, record, "degraded", extension)
        return EncodedSample(record, clean_bytes, degraded_bytes, extension, clean_shape, degraded_shape)

    @staticmethod
    def _read(image: ImageRef, record: dict[str, Any], role: str, extension: str) -> tuple[bytes, tuple[int, int, int]]:
        """The image's bytes, checked against the record's SHA-256, and its (height, width, channels)."""
        try:
            data = image.read_bytes()
        except (OSError, KeyError, tarfile.TarError) as error:
            raise ExportError(f"{image}: {_reason(error)} (mdsd3 verify lists every problem)") from None
        expected = record.get(f"{role}_sha256")
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise ExportError(f"{image}: SHA-256 differs from the manifest (mdsd3 verify lists every problem)")
        recorded = record.get(f"{role}_bytes")
        if recorded is not None and recorded != len(data):  # the LMDB maps are sized from the recorded sizes
            raise ExportError(f"{image}: {len(data)} bytes, the manifest's {role}_bytes is {recorded!r}")
        return data, _header_shape(data, image, tuple(record["size"]), PIL_FORMATS[extension])


def _line_hash(line: bytes) -> bytes:
    return hashlib.blake2b(line, digest_size=16).digest()


def _header_shape(data: bytes, image: ImageRef, size: tuple[int, ...], pil_format: str) -> tuple[int, int, int]:
    """(height, width, channels) from `data`'s image header; ExportError when it is not a `pil_format` image, has
    more pixels than Pillow's MAX_IMAGE_PIXELS, or is not the record's `size` (width, height). The pixel data is
    not decoded (about 1000 times the cost; `mdsd3 verify` decodes every image in full)."""
    try:
        with Image.open(io.BytesIO(data), formats=[pil_format]) as header:
            width, height, channels = header.width, header.height, len(header.getbands())
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise ExportError(f"{image}: not a {pil_format} image ({error})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        raise ExportError(
            f"{image}: {width}x{height} pixels is more than Pillow's MAX_IMAGE_PIXELS ({limit}); "
            "refusing a possible decompression bomb"
        )
    if (width, height) != size:
        raise ExportError(f"{image}: decodes to {width}x{height}, the manifest's size is {size[0]}x{size[1]}")
    return height, width, channels


def _stored(root: Path, record: dict[str, Any], role: str) -> ImageRef:
    """Where a record's image is (file or tar member); ExportError when its path leaves the dataset."""
    image = record_image(root, record, role)
    if image is None:
        raise ExportError(
            f"the {role} image of key {record['key']!r} ({record.get(TAR_FIELD, record.get(role))!r}) is "
            "outside the dataset"
        )
    return image


def _reason(error: BaseException) -> str:
    if isinstance(error, KeyError):
        return "not in its tar"
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)
