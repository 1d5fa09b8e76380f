"""`mdsd3 verify`: check a generate output folder (any layout) against its manifest.

The run must be finished: every shard's finished marker matches its recorded plan and no generate is writing it
(`dataset.completeness`). Every record's files must exist, decode to the recorded size and have the recorded byte
count and SHA-256; every key must have all of the run's variant folders; every file under clean/, degraded/ and
tars/ must belong to a record (anything else is an orphan), and a tar must not hold a member name twice. Files
are hashed and decoded on a thread pool (hashlib and Pillow release the GIL), so verification runs on every core.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mdsd3_cli.dataset.completeness import Completeness, completeness
from mdsd3_cli.dataset.manifest import (
    FILE_FIELDS,
    MAX_LINE_BYTES,
    MEMBER_FIELDS,
    TAR_FIELD,
    number_problem,
    open_regular,
    run_folders,
    run_info,
)
from mdsd3_cli.dataset.names import (
    ERRORS_FOLDER,
    ERRORS_SUFFIX,
    IMAGE_FOLDERS,
    MANIFEST_FOLDER,
    MANIFEST_SUFFIX,
    RUN_JSON,
    is_generate_output,
)
from mdsd3_cli.dataset.reader import BadLine, manifest_entries, manifest_files
from mdsd3_cli.dataset.stored_images import inside_dataset, too_large
from mdsd3_cli.util.images import ImageError, decode_rgb
from mdsd3_cli.util.ordered_map import ordered_map
from mdsd3_cli.util.progress import RunProgress

LISTED_PER_KIND = 20
"""Problems of one kind listed by `print_problems`; the rest are counted."""
HASH_CHUNK_BYTES = 1 << 20
"""Bytes hashed at a time: an image is never held whole to be hashed."""


class NotADatasetError(ValueError):
    """The folder holds no manifest: it is not a generate output folder."""


@dataclass(frozen=True)
class Expected:
    """What a record says about one image file; None where an older manifest did not record it."""

    sha256: str | None
    size: int | None
    dims: tuple[int, int] | None
    """(width, height)."""


@dataclass(frozen=True)
class Problem:
    """One finding: `kind` is unfinished, missing, size, hash, decode, manifest, incomplete, conflict, duplicate or
    orphan."""

    kind: str
    where: str
    detail: str


@dataclass
class VerifyReport:
    """What `verify_dataset` checked and found."""

    dataset: Path
    records: int = 0
    files: int = 0
    bytes: int = 0
    unhashed: int = 0
    failed_inputs: int = 0
    elapsed_s: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    completeness: Completeness | None = None
    export: str | None = None
    """The format when the folder is an export's destination (checked by `export.check`), else None."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def files_per_s(self) -> float:
        return self.files / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for problem in self.problems:
            counts[problem.kind] += 1
        return dict(sorted(counts.items()))

    def run_state(self) -> str:
        """complete, unfinished (how many shards), or not recorded (an output of an earlier mdsd3)."""
        if self.export is not None:
            partial = any(problem.kind == "unfinished" for problem in self.problems)
            return f"{self.export} export" + (" ([bold red]partial[/])" if partial else "")
        state = self.completeness
        if state is None or not state.recorded:
            return "completeness not recorded (an output of an earlier mdsd3)" + (
                "; unfinished" if state is not None and state.unfinished else ""
            )
        finished = sum(shard.finished and shard.writer is None for shard in state.shards)
        if not state.unfinished:
            return f"complete ({len(state.shards)} of {len(state.shards)} shards finished)"
        return f"[bold red]unfinished[/] ({finished} of {len(state.shards)} shards finished)"

    def table(self) -> Table:
        table = Table(title=f"mdsd3 verify — {self.dataset}", show_header=False)
        rows = [
            ("records", self.records),
            ("files checked", self.files),
            ("MiB read", f"{self.bytes / 2**20:.1f}"),
            ("elapsed", f"{self.elapsed_s:.2f} s"),
            ("files/s", f"{self.files_per_s:.0f}"),
            ("MiB/s", f"{self.bytes / 2**20 / self.elapsed_s:.1f}" if self.elapsed_s > 0 else "-"),
            ("failed inputs (errors/, not checked)", self.failed_inputs),
        ]
        if self.unhashed:
            rows.append(("files without a recorded hash (older manifest)", self.unhashed))
        rows.append(("run", self.run_state()))
        rows += [(f"problems: {kind}", count) for kind, count in self.counts().items()]
        rows.append(("result", "[green]ok[/]" if self.ok else f"[bold red]{len(self.problems)} problems[/]"))
        for name, value in rows:
            table.add_row(name, str(value))
        return table


@dataclass
class _Index:
    """The manifest, reduced to what verification needs."""

    files: dict[str, Expected] = field(default_factory=dict)
    """Folders layout: path relative to the dataset -> expectation."""
    members: dict[str, dict[str, Expected | dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))
    """Webdataset layout: tar path -> member name -> expectation (images) or the key's records by folder (its
    `.json` member)."""
    folders_by_key: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    samples: int = 0
    """Distinct (key, folder) records."""


def verify_dataset(
    dataset: str | os.PathLike, workers: int | None = None, console: Console | None = None
) -> VerifyReport:
    """Check every record and file of `dataset`; the report lists each problem found."""
    root = Path(dataset).expanduser().resolve()
    if not is_generate_output(root):
        raise NotADatasetError(f"{root} has no {MANIFEST_FOLDER}/ folder; is it an mdsd3 generate output folder?")
    started = time.perf_counter()
    report = VerifyReport(root)
    recorded: dict[str, int] = {}
    index = _read_manifests(root, report, recorded)
    report.completeness = completeness(root, recorded, index.samples)
    report.problems += [Problem("unfinished", "run", reason) for reason in report.completeness.unfinished]
    report.problems += _incomplete_keys(root, index, report)
    report.failed_inputs = sum(
        _count_lines(path, report) for path in sorted(root.glob(f"{ERRORS_FOLDER}/*{ERRORS_SUFFIX}"))
    )
    tasks: list[Callable[[], _Checked]] = [
        _file_task(root, relative, expected) for relative, expected in sorted(index.files.items())
    ]
    tasks += [_tar_task(root, tar, members) for tar, members in sorted(index.members.items())]
    total = len(index.files) + sum(len(members) for members in index.members.values())
    workers = workers or os.cpu_count() or 1
    with RunProgress(total, "verify", unit="files", console=console) as progress:
        for checked in ordered_map(lambda task: task(), tasks, workers, name="mdsd3-verify"):
            report.files += checked.files
            report.bytes += checked.bytes
            report.problems += checked.problems
            progress.advance(checked.files)
    referenced = set(index.files) | set(index.members)
    report.problems += [
        Problem("orphan", relative, "no manifest record refers to this file")
        for relative in _dataset_files(root)
        if relative not in referenced
    ]
    report.elapsed_s = time.perf_counter() - started
    return report


def print_problems(report: VerifyReport, console: Console) -> None:
    """One line per problem (at most LISTED_PER_KIND per kind, then a count)."""
    listed: dict[str, int] = defaultdict(int)
    for problem in report.problems:
        listed[problem.kind] += 1
        if listed[problem.kind] <= LISTED_PER_KIND:
            console.print(f"[red]{problem.kind}[/] {escape(problem.where)}: {escape(problem.detail)}", highlight=False)
    for kind, count in report.counts().items():
        if count > LISTED_PER_KIND:
            console.print(f"[red]{kind}[/] ... and {count - LISTED_PER_KIND} more", highlight=False)


def _read_manifests(root: Path, report: VerifyReport, recorded: dict[str, int]) -> _Index:
    """The records of every manifest; `recorded` gains each manifest's count of distinct samples (by its stem)."""
    index = _Index()
    seen: dict[tuple[str, str], bytes] = {}
    read = manifest_files(root)
    report.problems += [
        Problem("manifest", _relative(root, path), "not a regular file (a link, folder or pipe); not read")
        for path in sorted(root.glob(f"{MANIFEST_FOLDER}/*{MANIFEST_SUFFIX}"))
        if path not in read
    ]
    own: dict[Path, set[tuple[str, str]]] = {manifest: set() for manifest in read}

    def bad(line: BadLine) -> None:
        report.problems.append(Problem("manifest", f"{_relative(root, line.manifest)}:{line.number}", line.reason))

    for entry in manifest_entries(root, read, bad=bad):
        record, sample = entry.record, entry.sample
        where = f"{_relative(root, entry.manifest)}:{entry.number}"
        report.records += 1
        own[entry.manifest].add(sample)
        problem = number_problem(record)
        if problem is not None:
            report.problems.append(Problem("manifest", where, problem))
        digest = hashlib.blake2b(json.dumps(record, sort_keys=True).encode(), digest_size=16).digest()
        if sample in seen:
            if seen[sample] != digest:
                report.problems.append(
                    Problem("conflict", where, f"a second, different record for key {sample[0]!r} folder {sample[1]!r}")
                )
            continue
        seen[sample] = digest
        index.samples += 1
        index.folders_by_key[record["key"]].add(record["folder"])
        _index_record(root, record, where, index, report)
    recorded.update({manifest.name.removesuffix(MANIFEST_SUFFIX): len(samples) for manifest, samples in own.items()})
    return index


def _relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _index_record(root: Path, record: dict[str, Any], where: str, index: _Index, report: VerifyReport) -> None:
    size = record.get("size")
    dims = (size[0], size[1]) if isinstance(size, list) and len(size) == 2 else None
    if TAR_FIELD in record:
        tar = record[TAR_FIELD]
        if inside_dataset(root, tar) is None:
            report.problems.append(
                Problem("manifest", where, f"field tar: {tar!r} is outside the dataset (or not a relative path)")
            )
            return
        members = index.members[tar]
        for role in FILE_FIELDS:
            member, expected = record[MEMBER_FIELDS[role]], _expected(record, role, dims, report)
            if members.setdefault(member, expected) != expected:  # a key's folders share its clean image
                report.problems.append(
                    Problem("conflict", where, f"{tar}:{member} is recorded with another size, hash or role")
                )
        records = members.setdefault(record[MEMBER_FIELDS["json"]], {})
        if isinstance(records, dict):
            records[record["folder"]] = record
        else:
            report.problems.append(
                Problem(
                    "conflict", where, f"{tar}:{record[MEMBER_FIELDS['json']]} is recorded as an image and as records"
                )
            )
        return
    for role in FILE_FIELDS:
        relative = record[role]
        if inside_dataset(root, relative) is None:
            report.problems.append(
                Problem(
                    "manifest",
                    where,
                    f"field {role}: path {relative!r} is outside the dataset (or not a relative path)",
                )
            )
            continue
        expected = _expected(record, role, dims, report)
        known = index.files.setdefault(relative, expected)
        if known != expected:
            report.problems.append(Problem("conflict", where, f"{relative} is recorded with another size or hash"))


def _expected(record: dict[str, Any], role: str, dims: tuple[int, int] | None, report: VerifyReport) -> Expected:
    sha256, size = record.get(f"{role}_sha256"), record.get(f"{role}_bytes")
    if sha256 is None:
        report.unhashed += 1
    return Expected(sha256 if isinstance(sha256, str) else None, size if isinstance(size, int) else None, dims)


def _incomplete_keys(root: Path, index: _Index, report: VerifyReport) -> list[Problem]:
    """Keys that lack some of the run's variant folders (from run.json; else every folder seen)."""
    expected = _run_folders(root, report)
    if expected is None:
        expected = sorted({folder for folders in index.folders_by_key.values() for folder in folders})
    problems = []
    for key, folders in sorted(index.folders_by_key.items()):
        missing = [folder for folder in expected if folder not in folders]
        if missing:
            problems.append(Problem("incomplete", key, f"no record for variant folders {', '.join(missing)}"))
    return problems


def _run_folders(root: Path, report: VerifyReport) -> list[str] | None:
    try:
        return run_folders(run_info(root))
    except FileNotFoundError:
        report.problems.append(Problem("manifest", RUN_JSON, "missing"))
    except (OSError, ValueError) as error:
        report.problems.append(Problem("manifest", RUN_JSON, f"unreadable: {error}"))
    return None


def _count_lines(path: Path, report: VerifyReport) -> int:
    """Lines of an errors/ file; 0 (and a problem) when it is not a readable regular file."""
    try:
        with open_regular(path) as handle:
            return sum(1 for _ in iter(lambda: handle.readline(1 << 20), b""))
    except OSError as error:
        report.problems.append(Problem("manifest", path.relative_to(report.dataset).as_posix(), f"unreadable: {error}"))
        return 0


def _dataset_files(root: Path) -> Iterator[str]:
    """Every file (and link) under the scanned folders, relative to `root`."""
    for folder in IMAGE_FOLDERS:
        for directory, _, names in os.walk(root / folder):
            for name in names:
                yield (Path(directory) / name).relative_to(root).as_posix()


@dataclass
class _Checked:
    files: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)


def _file_task(root: Path, relative: str, expected: Expected) -> Callable[[], _Checked]:
    def check() -> _Checked:
        checked = _Checked(files=1)
        path = root / relative
        try:
            if path.is_symlink() or not path.is_file():
                raise FileNotFoundError
            with open_regular(path) as file:
                checked.bytes, checked.problems = _check_stream(
                    relative, file, os.fstat(file.fileno()).st_size, expected
                )
        except FileNotFoundError:
            checked.problems.append(Problem("missing", relative, "recorded in the manifest but not on disk"))
        except OSError as error:
            checked.problems.append(Problem("missing", relative, f"unreadable: {error.strerror or error}"))
        return checked

    return check


def _tar_task(root: Path, tar: str, members: dict[str, Expected | dict[str, Any]]) -> Callable[[], _Checked]:
    def check() -> _Checked:
        checked = _Checked()
        found: set[str] = set()
        seen: set[str] = set()
        try:
            with open_regular(root / tar) as file, tarfile.open(fileobj=file, mode="r:") as archive:
                for member in archive:
                    where = f"{tar}:{member.name}"
                    if member.name in seen:
                        checked.problems.append(Problem("duplicate", where, "a second tar member of this name"))
                        continue
                    seen.add(member.name)
                    expected = members.get(member.name)
                    if expected is None:
                        checked.problems.append(Problem("orphan", where, "tar member without a manifest record"))
                        continue
                    found.add(member.name)
                    checked.files += 1
                    stream = archive.extractfile(member) if member.isfile() else io.BytesIO()
                    size = member.size if member.isfile() else 0
                    if isinstance(expected, dict):
                        read, problems = _check_records(where, stream, size, expected)
                    else:
                        read, problems = _check_stream(where, stream, size, expected)
                    checked.bytes += read
                    checked.problems += problems
        except FileNotFoundError:
            pass
        except (OSError, tarfile.TarError) as error:
            checked.problems.append(Problem("decode", tar, f"unreadable tar: {error}"))
        for name in sorted(set(members) - found):
            checked.files += 1
            checked.problems.append(Problem("missing", f"{tar}:{name}", "recorded in the manifest but not on disk"))
        return checked

    return check


def _check_records(where: str, stream: BinaryIO, size: int, expected: dict[str, Any]) -> tuple[int, list[Problem]]:
    """Bytes read and the problems of a key's `.json` member: its records must be the manifest's (a member over
    MAX_LINE_BYTES per record is not read)."""
    if size > MAX_LINE_BYTES * len(expected):
        return 0, [Problem("size", where, f"{size} bytes for {len(expected)} record(s); not read")]
    data = stream.read()
    if _member_records(data) != expected:
        return len(data), [Problem("hash", where, "differs from its manifest records")]
    return len(data), []


def _member_records(data: bytes) -> Any:
    """A `.json` member's records by folder (an earlier version's member held one record), or None."""
    try:
        records = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if isinstance(records, dict) and isinstance(records.get("folder"), str):
        return {records["folder"]: records}
    return records


def check_bytes(where: str, data: bytes, expected: Expected) -> list[Problem]:
    """What is wrong with an image's bytes against what a record says (size, SHA-256, decoding, pixel size)."""
    return _check_stream(where, io.BytesIO(data), len(data), expected)[1]


def _check_stream(where: str, stream: BinaryIO, size: int, expected: Expected) -> tuple[int, list[Problem]]:
    """Bytes read and the problems of one image of `size` bytes: its size, SHA-256 (hashed in chunks) and decoding
    (from the stream). One larger than its record or than `stored_images.MAX_IMAGE_BYTES` is not read."""
    problems = []
    if expected.size is not None and size != expected.size:
        problems.append(
            Problem(
                "size",
                where,
                f"{size} bytes, manifest says {expected.size}" + ("; not read" if size > expected.size else ""),
            )
        )
        if size > expected.size:
            return 0, problems
    over = too_large(size)
    if over is not None:
        return 0, [*problems, Problem("size", where, f"{over}; not read")]
    digest = hashlib.sha256()
    for chunk in iter(lambda: stream.read(HASH_CHUNK_BYTES), b""):
        digest.update(chunk)
    if expected.sha256 is not None and digest.hexdigest() != expected.sha256:
        problems.append(Problem("hash", where, "SHA-256 differs from the manifest"))
    stream.seek(0)
    try:
        dims = decode_rgb(stream).size
    except ImageError as error:
        problems.append(Problem("decode", where, f"does not decode: {error.reason}"))
        return size, problems
    if expected.dims is not None and dims != expected.dims:
        problems.append(
            Problem("size", where, f"{dims[0]}x{dims[1]} pixels, manifest says {expected.dims[0]}x{expected.dims[1]}")
        )
    return size, problems
