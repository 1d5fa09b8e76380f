"""`output.layout: webdataset`: a generate shard writes tars instead of clean/ and degraded/ folders.

Each key (source image) is one WebDataset sample holding its clean image once and every variant's degraded image
(`tar_format.key_members`). A shard's keys (in plan order) are cut into fixed groups of `samples_per_tar`
consecutive keys; group g becomes `tars/<shard>-<g:06d>.tar`, its keys in plan order. Tar membership is a
function of the plan, so a rerun rebuilds exactly the same tars. A tar is written under a temporary name and
renamed when its last key is in; its records' manifest lines (one per key and folder, each as the key's `.json`
member holds it) are appended after the rename. On resume a group is finished when the file at its tar's name
is a regular file (never a link) holding exactly the members of that group's keys, each image the size its
record says, and the shard's manifest lists those records byte for byte; a kill between the rename and the
append is recognised when the unlisted records' images match their SHA-256, and their lines are restored.
Anything else at a tar's name (a link, a foreign or damaged file) is not trusted: the group is redone and the
file replaced. Inputs that fail to decode are left out of their tar and listed in errors/; a tar missing only keys
that errors/ lists is finished too, so those inputs are not retried (their lines are carried into the next run's
errors/). A rerun must have the same plan (inputs, --limit, shard count): `manifest/<shard>.tars.json` records the
plan's digest and another plan is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
import tarfile
from collections import defaultdict
from collections.abc import Container, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mdsd3_cli.dataset.encoding import FORMAT_EXTENSIONS, ImageFormat, digest, encode_image, file_digest_fields
from mdsd3_cli.dataset.layout_writer import LayoutWriter, Plan, PlannedSample, Sample
from mdsd3_cli.dataset.manifest import MEMBER_FIELDS, TAR_FIELD, parse_record
from mdsd3_cli.dataset.names import (
    MANIFEST_FOLDER,
    MANIFEST_SUFFIX,
    TARS_FOLDER,
    TARS_PLAN_SUFFIX,
    parse_shard,
    parse_tar_name,
    shard_file,
    tar_name,
)
from mdsd3_cli.dataset.output_paths import OutputPaths
from mdsd3_cli.dataset.reader import manifest_entries
from mdsd3_cli.dataset.run_record import OutputConflictError
from mdsd3_cli.dataset.shard_log import ErrorLine, ShardLog, recorded_failures
from mdsd3_cli.dataset.tar_format import EncodedSample, TarWriter, key_members, record_json
from mdsd3_cli.recipe.generate import TAR_SAMPLE, OutputSection
from mdsd3_cli.util.atomic import atomic_write


def tar_path(out_dir: Path, shard: str, group: int) -> Path:
    return Path(out_dir) / TARS_FOLDER / tar_name(shard, group)


def shard_count(shard: str) -> int:
    """The shard count a shard name says; ValueError when `shard` is not a shard name (`names.shard_name`)."""
    parsed = parse_shard(shard)
    if parsed is None:
        raise ValueError(f"{shard!r} is not a shard name (shard-NNNNN-of-NNNNN)")
    return parsed[1]


def groups_of(items: Sequence[PlannedSample], keys_per_tar: int) -> list[list[PlannedSample]]:
    """The shard's items cut into groups of `keys_per_tar` consecutive keys (the last may hold fewer); a plan
    lists each key's items together."""
    keys = [list(key_items) for _, key_items in itertools.groupby(items, key=lambda item: item.key)]
    return [
        [item for key_items in keys[start : start + keys_per_tar] for item in key_items]
        for start in range(0, len(keys), keys_per_tar)
    ]


def check_same_plan(out_dir: Path, shard: str, items: Sequence[PlannedSample], samples_per_tar: int) -> None:
    """OutputConflictError when the folder holds tars of another plan: another shard count, or other items for
    this shard (inputs or --limit changed). Tar groups follow the plan, so mixing plans would lose or duplicate
    samples. Records this shard's plan digest for the next run."""
    folder = Path(out_dir) / TARS_FOLDER
    count = shard_count(shard)
    tars = [parsed for path in folder.glob("*.tar") if (parsed := parse_tar_name(path.name))]
    counts = {tar_count for _, tar_count, _ in tars}
    advice = "rerun with the same inputs, --limit and shard count, or pass --overwrite"
    if counts - {count}:
        raise OutputConflictError(
            f"{folder} holds tars of a run with {sorted(counts - {count})} shards "
            f"(not {count}); the webdataset layout resumes only the same plan: {advice}"
        )
    plan = {
        "tar_sample": TAR_SAMPLE,
        "samples_per_tar": samples_per_tar,
        "samples": len(items),
        "plan_sha256": hashlib.sha256(
            json.dumps([(item.key, item.folder) for item in items], ensure_ascii=True).encode("ascii")
        ).hexdigest(),
        "files": [
            f"{TARS_FOLDER}/{tar_path(out_dir, shard, group).name}"  # what --overwrite removes
            for group in range(len(groups_of(items, samples_per_tar)))
        ],
    }
    record = shard_file(out_dir, MANIFEST_FOLDER, shard, TARS_PLAN_SUFFIX)
    if any(tar[:2] == parse_shard(shard) for tar in tars) and record.is_file():
        try:
            stored = json.loads(record.read_text(encoding="utf-8"))
        except ValueError:
            stored = None
        if stored != plan:
            raise OutputConflictError(
                f"{folder} holds {shard} tars of another plan (inputs or --limit "
                f"changed; see {record}); the webdataset layout resumes only the same plan: "
                f"{advice}"
            )
    atomic_write(record, (json.dumps(plan, indent=2) + "\n").encode("ascii"), root=Path(out_dir))


_MAX_RECORD_BYTES = 1 << 20
"""Largest `.json` member read per folder of its key (a record is well under 4 KiB)."""


def listed_tar_lines(out_dir: Path, shard: str) -> dict[Sample, tuple[str, bytes]]:
    """The complete lines of this shard's manifest that record a sample in a tar: sample -> (tar, line)."""
    manifest = shard_file(out_dir, MANIFEST_FOLDER, shard, MANIFEST_SUFFIX)
    return {
        entry.sample: (entry.record[TAR_FIELD], entry.line)
        for entry in manifest_entries(out_dir, [manifest])
        if entry.in_tar
    }


def finished_groups(
    out_dir: Path,
    shard: str,
    items: Sequence[PlannedSample],
    samples_per_tar: int,
    extension: str,
    failed: Container[str] = (),
) -> dict[int, list[bytes]]:
    """The groups whose tar is finished (see the module's docstring), each with the manifest lines to restore
    (empty when the manifest lists them all); keys in `failed` (recorded failed inputs) are not expected in their
    tar, and a group of failed keys only is finished without one. Reads tars, writes nothing."""
    by_tar: dict[str, dict[Sample, bytes]] = defaultdict(dict)
    for sample, (tar, line) in listed_tar_lines(out_dir, shard).items():
        by_tar[tar][sample] = line
    finished = {}
    for index, group in enumerate(groups_of(items, samples_per_tar)):
        members = [item for item in group if item.key not in failed]
        path = tar_path(out_dir, shard, index)
        if not members:
            finished[index] = []
        elif os.path.lexists(path):
            relative = f"{TARS_FOLDER}/{path.name}"
            missing = _unlisted_lines_of_finished_tar(path, relative, members, by_tar[relative], extension)
            if missing is not None:
                finished[index] = missing
    return finished


def completed_tar_samples(
    out_dir: Path, shard: str, items: Sequence[PlannedSample], samples_per_tar: int, extension: str
) -> tuple[set[Sample], dict[str, ErrorLine]]:
    """(key, folder) of every item whose group's tar is finished, and the recorded failed inputs of those groups
    (settled: not retried)."""
    groups = groups_of(items, samples_per_tar)
    failures = recorded_failures(OutputPaths(out_dir), shard)
    done: set[Sample] = set()
    settled: dict[str, ErrorLine] = {}
    for index in finished_groups(out_dir, shard, items, samples_per_tar, extension, failures):
        for item in groups[index]:
            if item.key in failures:
                settled[item.key] = failures[item.key]
            else:
                done.add((item.key, item.folder))
    return done, settled


def _unlisted_lines_of_finished_tar(
    path: Path, relative: str, members: Sequence[PlannedSample], listed: Mapping[Sample, bytes], extension: str
) -> list[bytes] | None:
    """The lines of the finished tar at `path` that the manifest lacks (`listed`: the lines it has for this tar),
    or None when that file is not a finished tar of this group: a link, not a regular file, not a tar, other
    keys or members, or sizes, bytes or hashes that differ from the records."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None  # a link (ELOOP) or unreadable: the group is redone and the name replaced
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            return None
        try:
            with tarfile.open(fileobj=file, mode="r:") as archive:
                return _check_tar(archive, relative, members, listed, extension)
        except (tarfile.TarError, OSError, EOFError, ValueError, RecursionError):
            return None


def _check_tar(
    archive: tarfile.TarFile,
    relative: str,
    items: Sequence[PlannedSample],
    listed: Mapping[Sample, bytes],
    extension: str,
) -> list[bytes] | None:
    """`_unlisted_lines_of_finished_tar` on an open tar."""
    folders: dict[str, list[str]] = defaultdict(list)
    for item in items:
        folders[item.key].append(item.folder)
    if not set(listed) <= {(item.key, item.folder) for item in items}:
        return None
    members = {key: key_members(key, key_folders, extension) for key, key_folders in folders.items()}
    entries = archive.getmembers()
    sizes = {entry.name: entry.size for entry in entries if entry.isfile()}
    if [entry.name for entry in entries] != [name for names in members.values() for name in names.names()] or len(
        sizes
    ) != len(entries):
        return None
    missing = []
    for key, key_folders in folders.items():
        names = members[key]
        if sizes[names.json] > _MAX_RECORD_BYTES * len(key_folders):
            return None
        records = json.loads(archive.extractfile(names.json).read())  # ValueError: not this group's tar
        if not isinstance(records, dict) or list(records) != sorted(key_folders):
            return None
        unlisted = []
        for folder in key_folders:
            line = record_json(records[folder]) + b"\n"
            record = parse_record(line)  # ManifestLineError is a ValueError
            if (
                (record["key"], record["folder"]) != (key, folder)
                or record.get(TAR_FIELD) != relative
                or record.get(MEMBER_FIELDS["clean"]) != names.clean
                or record.get(MEMBER_FIELDS["degraded"]) != names.degraded[folder]
                or record.get(MEMBER_FIELDS["json"]) != names.json
                or record.get("clean_bytes") != sizes[names.clean]
                or record.get("degraded_bytes") != sizes[names.degraded[folder]]
            ):
                return None
            if (key, folder) in listed:
                if listed[key, folder] != line:
                    return None
            else:
                unlisted.append((record, line))
        if unlisted:  # a kill between the tar's rename and its manifest lines: trusted when the bytes match
            checks = [
                (names.clean, unlisted[0][0].get("clean_sha256")),
                *((names.degraded[record["folder"]], record.get("degraded_sha256")) for record, _ in unlisted),
            ]
            if any(hashlib.sha256(archive.extractfile(name).read()).hexdigest() != sha for name, sha in checks):
                return None
            if any(record.get("clean_sha256") != unlisted[0][0].get("clean_sha256") for record, _ in unlisted):
                return None
            missing += [line for _, line in unlisted]
    return missing


@dataclass
class _Key:
    """One key's sample being assembled: its folders in plan order, the clean image, the encoded pairs."""

    folders: list[str]
    clean: Future[bytes] | None = None
    submitted: set[str] = field(default_factory=set)
    ready: dict[str, EncodedSample] = field(default_factory=dict)
    skipped: bool = False

    @property
    def complete(self) -> bool:
        return len(self.ready) == len(self.folders)


@dataclass
class _Group:
    """A tar being assembled: keys' pairs arrive in any order; keys are appended in plan order."""

    keys: list[str]
    path: Path
    next: int = 0
    lines: list[bytes] = field(default_factory=list)
    tar: TarWriter | None = None
    samples: int = 0
    """Samples appended to `tar` so far (kept only when it is finished)."""


class WebDatasetLayoutWriter(LayoutWriter):
    """Writes one shard's tars (see the module's docstring).

    Images are encoded on worker threads (the bytes equal the folders layout's), a key's clean image once;
    `submit` blocks while too many samples are being encoded. The first worker failure is raised by the next
    `submit`, `drain` or `close`.
    """

    def __init__(
        self,
        out_dir: str | Path,
        shard: str,
        items: Sequence[PlannedSample],
        samples_per_tar: int,
        fmt: ImageFormat = "png",
        quality: int = 95,
        png_compress_level: int = 1,
        workers: int = 2,
    ) -> None:
        super().__init__(workers, "mdsd3-tar")
        self.layout = OutputPaths(out_dir, fmt)
        self.shard, self.fmt, self.quality, self.png_compress_level = shard, fmt, quality, png_compress_level
        self.extension = FORMAT_EXTENSIONS[fmt]
        self.written = self.errors = self.bytes_written = 0
        check_same_plan(self.layout.root, shard, items, samples_per_tar)
        finished = finished_groups(
            self.layout.root, shard, items, samples_per_tar, self.extension, recorded_failures(self.layout, shard)
        )  # read before _log truncates it
        self._listed = set(listed_tar_lines(self.layout.root, shard))
        self._groups: dict[int, _Group] = {}
        self._keys: dict[str, _Key] = {}
        self._group_of: dict[str, int] = {}
        for index, members in enumerate(groups_of(items, samples_per_tar)):
            if index in finished:
                continue
            keys = list(dict.fromkeys(item.key for item in members))
            self._groups[index] = _Group(keys, tar_path(self.layout.root, shard, index))
            for key in keys:
                self._group_of[key] = index
                self._keys[key] = _Key([item.folder for item in members if item.key == key])
        self._log = ShardLog(self.layout, shard)
        restored = [line for index in sorted(finished) for line in finished[index]]
        if restored:
            self._log.append_records(restored)

    @classmethod
    def open(cls, out_dir: Path, shard: str, output: OutputSection, plan: Plan) -> WebDatasetLayoutWriter:
        return cls(
            out_dir,
            shard,
            plan(),
            output.samples_per_tar,
            output.format,
            output.quality,
            output.png_compress_level,
            output.workers,
        )

    @classmethod
    def completed(
        cls, out_dir: Path, shard: str, output: OutputSection, plan: Plan
    ) -> tuple[set[Sample], dict[str, ErrorLine]]:
        """The samples of the shard's finished tars, and the recorded failed inputs of those tars (settled)."""
        return completed_tar_samples(out_dir, shard, plan(), output.samples_per_tar, FORMAT_EXTENSIONS[output.format])

    def submit(self, record: Mapping[str, Any], clean: np.ndarray, degraded: np.ndarray) -> None:
        """Queue one sample of this shard's plan (`record` needs `key` and `folder`)."""
        self._check_open()
        key, folder = record["key"], record["folder"]
        record_json(dict(record))  # a record that cannot be written fails here, in the caller
        with self._lock:
            state = self._keys.get(key)
            if state is None or folder not in state.folders or folder in state.submitted:
                raise ValueError(f"sample key={key!r} folder={folder!r} is not an unfinished sample of {self.shard}")
            state.submitted.add(folder)
            if state.clean is None:
                state.clean = self._pool.submit(self._encode, clean.copy())
            clean_bytes = state.clean
        self._slots.acquire()
        self._start(self._write_sample, dict(record), clean_bytes, degraded.copy())

    def record_error(self, key: str | None, path: str | Path, reason: str) -> None:
        """Log a skipped input; its key is left out of its tar."""
        self._log.record_error(key, path, reason)
        with self._lock:
            self.errors += 1
            if key in self._keys:
                self._keys[key].skipped = True
                self._pump(self._group_of[key])

    def _release(self) -> None:
        """A tar whose keys did not all arrive is dropped (redone by the next run)."""
        for group in self._groups.values():
            if group.tar is not None:
                group.tar.abort()
        self._log.close()

    def _encode(self, pixels: np.ndarray) -> bytes:
        return encode_image(pixels, self.fmt, self.quality, self.png_compress_level)

    def _write_sample(self, record: dict[str, Any], clean: Future[bytes], degraded: np.ndarray) -> None:
        try:
            degraded_bytes = self._encode(degraded)
            clean_bytes = clean.result()
            key, folder = record["key"], record["folder"]
            state, group = self._keys[key], self._group_of[key]
            names = key_members(key, state.folders, self.extension)
            record.update(
                {
                    TAR_FIELD: self.layout.relative(self._groups[group].path),
                    MEMBER_FIELDS["clean"]: names.clean,
                    MEMBER_FIELDS["degraded"]: names.degraded[folder],
                    MEMBER_FIELDS["json"]: names.json,
                    **file_digest_fields("clean", *digest(clean_bytes)),
                    **file_digest_fields("degraded", *digest(degraded_bytes)),
                }
            )
            with self._lock:
                state.ready[folder] = EncodedSample(record, clean_bytes, degraded_bytes, self.extension)
                if state.complete:
                    self._pump(group)
        except BaseException as exc:
            exc.add_note(f"while writing sample key={record['key']!r} folder={record['folder']!r}")
            raise
        finally:
            self._slots.release()

    def _pump(self, index: int) -> None:
        """Append the group's keys that are next in plan order and complete; finish the tar when all are in
        (lock held)."""
        group = self._groups[index]
        while group.next < len(group.keys):
            state = self._keys[group.keys[group.next]]
            if state.skipped:
                del self._keys[group.keys[group.next]]
            elif state.complete:
                samples = [state.ready[folder] for folder in state.folders]
                if group.tar is None:
                    group.tar = TarWriter(group.path, self.layout.root)
                group.tar.write_key(samples)
                group.lines += [
                    record_json(sample.record) + b"\n"
                    for sample in samples
                    if (sample.key, sample.folder) not in self._listed
                ]  # listed by a killed run
                self.bytes_written += len(samples[0].clean) + sum(len(sample.degraded) for sample in samples)
                group.samples += len(samples)
                del self._keys[group.keys[group.next]]
            else:
                return
            group.next += 1
        if group.tar is not None:
            group.tar.close()
            self._log.append_records(group.lines)
        self.written += group.samples
        del self._groups[index]
