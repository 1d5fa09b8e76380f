"""`mdsd3 verify` of an export's destination: each format checked against its own metadata.

WebDataset: every key's `.json` member holds its records; each image member must have the size and SHA-256 its
record gives and decode to the record's size; no member or key twice, none without a record, none missing.
LMDB: every database's keys are exactly its meta_info.txt's, every database has the same keys (what BasicSR
needs), each value decodes to the shape its meta_info line gives. Parquet: each row's images have the size and
SHA-256 of its `manifest` column and decode to its size; `key` and `folder` match it; no pair twice. A `--partial`
export (PARTIAL_EXPORT.json, or the Parquet metadata key) is reported as unfinished.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pyarrow.parquet as pq
from PIL import Image

from mdsd3_cli.dataset.manifest import open_regular
from mdsd3_cli.dataset.tar_format import flat_key, key_members
from mdsd3_cli.dataset.verify import Expected, Problem, VerifyReport, check_bytes
from mdsd3_cli.export.basicsr_lmdb import GT_NAME, META_INFO
from mdsd3_cli.export.parquet import PARTIAL_METADATA_KEY
from mdsd3_cli.export.staging import PARTIAL_FILE

_TAR = re.compile(r"data-\d{6}\.tar")
_PARQUET = re.compile(r"data-\d{5}\.parquet")
_META_LINE = re.compile(r"(?P<key>[^ .]+)\.(?P<ext>[a-z]+) \((?P<h>\d+),(?P<w>\d+),(?P<c>\d+)\) -?\d+")
_ROWS_PER_BATCH = 64


def export_format(folder: Path) -> str | None:
    """webdataset, lmdb or parquet when `folder` holds what `mdsd3 export` writes, else None."""
    folder = Path(folder)
    if (folder / GT_NAME).is_dir():
        return "lmdb"
    names = [path.name for path in folder.iterdir()] if folder.is_dir() else []
    if any(_TAR.fullmatch(name) for name in names):
        return "webdataset"
    if any(_PARQUET.fullmatch(name) for name in names):
        return "parquet"
    return None


def verify_export(folder: str | os.PathLike) -> VerifyReport:
    """Check an export's destination against its own metadata; the report lists each problem found."""
    root = Path(folder).expanduser().resolve()
    started = time.perf_counter()
    kind = export_format(root)
    report = VerifyReport(root, export=kind)
    if kind == "webdataset":
        _check_tars(root, report)
    elif kind == "lmdb":
        _check_lmdb(root, report)
    elif kind == "parquet":
        _check_parquet(root, report)
    else:
        raise ValueError(f"{root} is neither a generate output (no manifest/) nor an mdsd3 export")
    if (root / PARTIAL_FILE).exists():
        report.problems.append(Problem("unfinished", PARTIAL_FILE, f"a --partial export: {_why(root / PARTIAL_FILE)}"))
    report.elapsed_s = time.perf_counter() - started
    return report


def _why(path: Path) -> str:
    try:
        with open_regular(path) as file:
            note = json.loads(file.read(1 << 20))
        return "; ".join(map(str, note["why"]))
    except (OSError, ValueError, KeyError, TypeError):
        return "its note is unreadable"


def _record_expectations(records: Any, where: str, report: VerifyReport) -> dict[str, dict[str, Any]] | None:
    """A `.json` member's records by folder, each with the fields the checks need; None (and a problem) if not."""
    fields = ("clean_sha256", "clean_bytes", "degraded_sha256", "degraded_bytes", "size")
    if (
        not isinstance(records, dict)
        or not records
        or not all(isinstance(record, dict) and all(name in record for name in fields) for record in records.values())
    ):
        report.problems.append(
            Problem("manifest", where, f"not a map of variant folder to records with {', '.join(fields)}")
        )
        return None
    return records


def _expected(record: dict[str, Any], role: str) -> Expected:
    size = record.get("size")
    dims = (size[0], size[1]) if isinstance(size, list) and len(size) == 2 else None
    return Expected(record.get(f"{role}_sha256"), record.get(f"{role}_bytes"), dims)


def _check_tars(root: Path, report: VerifyReport) -> None:
    keys_seen: dict[str, str] = {}
    for tar in sorted(path for path in root.iterdir() if _TAR.fullmatch(path.name)):
        members: dict[str, bytes] = {}
        try:
            with open_regular(tar) as file, tarfile.open(fileobj=file, mode="r:") as archive:
                for member in archive:
                    where = f"{tar.name}:{member.name}"
                    if member.name in members:
                        report.problems.append(Problem("duplicate", where, "a second tar member of this name"))
                        continue
                    members[member.name] = archive.extractfile(member).read() if member.isfile() else b""
        except (OSError, tarfile.TarError) as error:
            report.problems.append(Problem("decode", tar.name, f"unreadable tar: {error}"))
            continue
        by_stem: dict[str, list[str]] = defaultdict(list)
        for name in members:
            by_stem[name.split(".", 1)[0]].append(name)
        for stem, names in by_stem.items():
            json_name = f"{stem}.json"
            if json_name not in members:
                report.problems += [
                    Problem("orphan", f"{tar.name}:{name}", "no .json member of its key records it") for name in names
                ]
                continue
            if stem in keys_seen:
                report.problems.append(
                    Problem("duplicate", f"{tar.name}:{json_name}", f"key also in {keys_seen[stem]}")
                )
            keys_seen[stem] = tar.name
            try:
                records = json.loads(members[json_name])
            except (ValueError, RecursionError):
                records = None
            records = _record_expectations(records, f"{tar.name}:{json_name}", report)
            if records is None:
                continue
            report.records += len(records)
            first = next(iter(records.values()))
            extension = Path(str(first.get("clean", first.get("clean_member", "x.png")))).suffix.lstrip(".") or "png"
            expected = key_members(str(first.get("key", stem)), list(records), extension)
            if flat_key(str(first.get("key", ""))) != stem:
                report.problems.append(Problem("manifest", f"{tar.name}:{json_name}", "its records name another key"))
            wanted = {
                expected.clean: _expected(first, "clean"),
                **{expected.degraded[folder]: _expected(records[folder], "degraded") for folder in records},
            }
            for name, expectation in wanted.items():
                if name not in members:
                    report.problems.append(Problem("missing", f"{tar.name}:{name}", "its key's records name it"))
                    continue
                report.files += 1
                report.bytes += len(members[name])
                report.problems += check_bytes(f"{tar.name}:{name}", members[name], expectation)
            report.problems += [
                Problem("orphan", f"{tar.name}:{name}", "no record of its key names it")
                for name in names
                if name not in wanted and name != json_name
            ]


def _meta_info(database: Path, report: VerifyReport) -> dict[str, tuple[int, int, int]]:
    """meta_info.txt of one database: key -> (height, width, channels); bad lines are problems."""
    shapes: dict[str, tuple[int, int, int]] = {}
    where = f"{database.name}/{META_INFO}"
    try:
        with open_regular(database / META_INFO) as file:
            lines = file.read().decode("ascii", "replace").splitlines()
    except OSError as error:
        report.problems.append(Problem("missing", where, f"unreadable: {error}"))
        return shapes
    for number, line in enumerate(lines, 1):
        match = _META_LINE.fullmatch(line)
        if match is None:
            report.problems.append(Problem("manifest", f"{where}:{number}", "not '<key>.<ext> (h,w,c) level'"))
        elif match["key"] in shapes:
            report.problems.append(Problem("duplicate", f"{where}:{number}", f"key {match['key']!r} listed again"))
        else:
            shapes[match["key"]] = (int(match["h"]), int(match["w"]), int(match["c"]))
    return shapes


def _check_lmdb(root: Path, report: VerifyReport) -> None:
    databases = sorted([root / GT_NAME, *(path for path in root.glob("lq_*.lmdb") if path.is_dir())])
    key_sets: dict[str, set[str]] = {}
    for database in databases:
        shapes = _meta_info(database, report)
        report.records += len(shapes)
        stored: set[str] = set()
        try:
            environment = lmdb.open(str(database), readonly=True, lock=False, readahead=False)
        except lmdb.Error as error:
            report.problems.append(Problem("decode", database.name, f"not an LMDB database: {error}"))
            continue
        with environment, environment.begin() as transaction:
            for raw_key, value in transaction.cursor():
                key = raw_key.decode("ascii", "replace")
                stored.add(key)
                where = f"{database.name}:{key}"
                if key not in shapes:
                    report.problems.append(Problem("orphan", where, f"not listed in {META_INFO}"))
                    continue
                height, width, channels = shapes[key]
                report.files += 1
                report.bytes += len(value)
                report.problems += check_bytes(where, bytes(value), Expected(None, None, (width, height)))
                try:
                    with Image.open(io.BytesIO(value)) as header:
                        bands = len(header.getbands())
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                    continue  # check_bytes named it
                if bands != channels:
                    report.problems.append(Problem("size", where, f"{bands} channels, {META_INFO} says {channels}"))
        report.problems += [
            Problem("missing", f"{database.name}:{key}", f"listed in {META_INFO}, not in the database")
            for key in sorted(set(shapes) - stored)
        ]
        key_sets[database.name] = stored
    gt = key_sets.get(GT_NAME, set())
    for name, keys in key_sets.items():
        if keys != gt:
            report.problems.append(
                Problem(
                    "incomplete",
                    name,
                    f"{len(keys - gt)} keys not in {GT_NAME}, "
                    f"{len(gt - keys)} of its keys missing (BasicSR pairs need the same keys)",
                )
            )


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_ROWS_PER_BATCH):
        yield from batch.to_pylist()


def _check_parquet(root: Path, report: VerifyReport) -> None:
    seen: dict[tuple[str, str], str] = {}
    for path in sorted(item for item in root.iterdir() if _PARQUET.fullmatch(item.name)):
        try:
            metadata = pq.read_schema(path).metadata or {}
            if PARTIAL_METADATA_KEY.encode() in metadata:
                note = json.loads(metadata[PARTIAL_METADATA_KEY.encode()])
                report.problems.append(
                    Problem("unfinished", path.name, "a --partial export: " + "; ".join(map(str, note.get("why", []))))
                )
            for number, row in enumerate(_rows(path)):
                _check_row(path.name, number, row, seen, report)
        except (OSError, ValueError) as error:  # pyarrow's errors are both
            report.problems.append(Problem("decode", path.name, f"unreadable Parquet file: {error}"))


def _check_row(
    name: str, number: int, row: dict[str, Any], seen: dict[tuple[str, str], str], report: VerifyReport
) -> None:
    where = f"{name}:row {number}"
    try:
        record = json.loads(row.get("manifest") or "")
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict) or _record_expectations({"": record}, where, report) is None:
        return
    report.records += 1
    pair = (row.get("key"), row.get("folder"))
    if pair != (record.get("key"), record.get("folder")) or [row.get("width"), row.get("height")] != record["size"]:
        report.problems.append(Problem("manifest", where, "key, folder, width or height differ from its manifest"))
    if pair in seen:
        report.problems.append(Problem("duplicate", where, f"key {pair[0]!r} folder {pair[1]!r} also in {seen[pair]}"))
    seen[pair] = where
    for role in ("clean", "degraded"):
        data = (row.get(role) or {}).get("bytes") or b""
        report.files += 1
        report.bytes += len(data)
        report.problems += check_bytes(f"{where} {role}", data, _expected(record, role))
