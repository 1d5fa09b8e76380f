"""`output.layout: webdataset`: a generate shard writes tars instead of clean/ and degraded/ folders.

A shard's work items (in plan order) are cut into fixed groups of `samples_per_tar` consecutive items; group g
becomes `tars/<shard>-<g:06d>.tar`, its samples in plan order. Tar membership is a function of the plan, so a
rerun rebuilds exactly the same tars. A tar is written under a temporary name and renamed when its last sample
is in; its samples' manifest lines (each the sample's `.json` member) are appended after the rename. On
resume a group is finished when the file at its tar's name is a regular file (never a link) holding exactly
samples of that group, each member the size its record says, and the shard's manifest lists those records
byte for byte; a kill between the rename and the append is recognised when the unlisted samples' images match
their records' SHA-256, and their lines are restored. Anything else at a tar's name (a link, a foreign or
damaged file) is not trusted: the group is redone and the file replaced. Inputs that fail
to decode are left out of their tar (and listed in errors/). A rerun must have the same plan (inputs, --limit,
shard count): `manifest/<shard>.tars.json` records the plan's digest and another plan is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mdsd3_cli.util.atomic import atomic_write
from mdsd3_cli.util.background_writer import BackgroundWriter
from mdsd3_cli.dataset.manifest import MEMBER_FIELDS, TAR_FIELD, ManifestLineError, parse_record
from mdsd3_cli.generate.plan import ShardSpec, WorkItem
from mdsd3_cli.dataset.writer import (FORMAT_EXTENSIONS, DatasetWriter, ImageFormat, OutputConflictError, OutputLayout, digest,
                      encode_image, file_digest_fields)
from mdsd3_cli.export.sample import EncodedSample
from mdsd3_cli.export.webdataset import TarWriter, member_names, record_json

TARS_FOLDER = "tars"
PLAN_SUFFIX = ".tars.json"
_TAR_NAME = re.compile(r"^shard-\d{5}-of-(\d{5})-\d{6}\.tar$")


def tar_path(out_dir: Path, shard: ShardSpec, group: int) -> Path:
    return Path(out_dir) / TARS_FOLDER / f"{shard.name}-{group:06d}.tar"


def groups_of(items: Sequence[WorkItem], samples_per_tar: int) -> list[list[WorkItem]]:
    """The shard's items cut into consecutive groups of `samples_per_tar` (the last may be shorter)."""
    return [list(items[start:start + samples_per_tar]) for start in range(0, len(items), samples_per_tar)]


def check_same_plan(out_dir: Path, shard: ShardSpec, items: Sequence[WorkItem], samples_per_tar: int) -> None:
    """OutputConflictError when the folder holds tars of another plan: another shard count, or other items for
    this shard (inputs or --limit changed). Tar groups follow the plan, so mixing plans would lose or duplicate
    samples. Records this shard's plan digest for the next run."""
    folder = Path(out_dir) / TARS_FOLDER
    counts = {int(match.group(1)) for path in folder.glob("*.tar") if (match := _TAR_NAME.match(path.name))}
    advice = "rerun with the same inputs, --limit and shard count, or pass --overwrite"
    if counts - {shard.count}:
        raise OutputConflictError(f"{folder} holds tars of a run with {sorted(counts - {shard.count})} shards "
                                  f"(not {shard.count}); the webdataset layout resumes only the same plan: {advice}")
    plan = {"samples_per_tar": samples_per_tar, "samples": len(items), "plan_sha256": hashlib.sha256(
        json.dumps([(item.key, item.folder) for item in items], ensure_ascii=True).encode("ascii")).hexdigest(),
        "files": [f"{TARS_FOLDER}/{tar_path(out_dir, shard, group).name}"  # what --overwrite removes
                  for group in range(len(groups_of(items, samples_per_tar)))]}
    record = Path(out_dir) / "manifest" / f"{shard.name}{PLAN_SUFFIX}"
    if any(folder.glob(f"{shard.name}-*.tar")) and record.is_file():
        try:
            stored = json.loads(record.read_text(encoding="utf-8"))
        except ValueError:
            stored = None
        if stored != plan:
            raise OutputConflictError(f"{folder} holds {shard.name} tars of another plan (inputs or --limit "
                                      f"changed; see {record}); the webdataset layout resumes only the same plan: "
                                      f"{advice}")
    atomic_write(record, (json.dumps(plan, indent=2) + "\n").encode("ascii"), root=Path(out_dir))


Sample = tuple[str, str]
"""A sample of the plan: (key, variant folder)."""
_MAX_RECORD_BYTES = 1 << 20


def listed_tar_lines(out_dir: Path, shard: ShardSpec) -> dict[Sample, tuple[str, bytes]]:
    """The complete lines of this shard's manifest that record a sample in a tar: sample -> (tar, line)."""
    manifest = Path(out_dir) / "manifest" / f"{shard.name}.jsonl"
    listed: dict[Sample, tuple[str, bytes]] = {}
    try:
        if not stat.S_ISREG(os.lstat(manifest).st_mode):
            return listed  # the writer refuses it with a clear message
        with open(manifest, "rb") as handle:
            for line in handle:
                try:
                    record = parse_record(line)
                except ManifestLineError:
                    continue
                if TAR_FIELD in record:
                    listed[record["key"], record["folder"]] = (record[TAR_FIELD], line)
    except FileNotFoundError:
        pass
    return listed


def finished_groups(out_dir: Path, shard: ShardSpec, items: Sequence[WorkItem], samples_per_tar: int,
                    extension: str) -> dict[int, list[bytes]]:
    """The groups whose tar is finished (see the module's docstring), each with the manifest lines to restore
    (empty when the manifest lists them all); reads tars, writes nothing."""
    by_tar: dict[str, dict[Sample, bytes]] = defaultdict(dict)
    for sample, (tar, line) in listed_tar_lines(out_dir, shard).items():
        by_tar[tar][sample] = line
    finished = {}
    for index, members in enumerate(groups_of(items, samples_per_tar)):
        path = tar_path(out_dir, shard, index)
        if os.path.lexists(path):
            relative = f"{TARS_FOLDER}/{path.name}"
            missing = _unlisted_lines_of_finished_tar(path, relative, members, by_tar[relative], extension)
            if missing is not None:
                finished[index] = missing
    return finished


def completed_tar_samples(out_dir: Path, shard: ShardSpec, items: Sequence[WorkItem], samples_per_tar: int,
                          extension: str) -> set[Sample]:
    """(key, folder) of every item whose group's tar is finished."""
    groups = groups_of(items, samples_per_tar)
    return {(item.key, item.folder) for index in finished_groups(out_dir, shard, items, samples_per_tar, extension)
            for item in groups[index]}


def _unlisted_lines_of_finished_tar(path: Path, relative: str, members: Sequence[WorkItem],
                                    listed: Mapping[Sample, bytes], extension: str) -> list[bytes] | None:
    """The lines of the finished tar at `path` that the manifest lacks (`listed`: the lines it has for this tar),
    or None when that file is not a finished tar of this group: a link, not a regular file, not a tar, other
    samples or members, or sizes, bytes or hashes that differ from the records."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None  # a link (ELOOP) or unreadable: the group is redone and the name replaced
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            return None
        try:
            with tarfile.open(fileobj=file, mode="r:") as archive:
                return _check_tar(archive, relative, {(item.key, item.folder) for item in members}, listed, extension)
        except (tarfile.TarError, OSError, EOFError, ValueError):
            return None


def _check_tar(archive: tarfile.TarFile, relative: str, group: set[Sample], listed: Mapping[Sample, bytes],
               extension: str) -> list[bytes] | None:
    """`_unlisted_lines_of_finished_tar` on an open tar."""
    entries = archive.getmembers()
    sizes = {entry.name: entry.size for entry in entries if entry.isfile()}
    if not entries or len(sizes) != len(entries):
        return None
    covered, missing, samples = set(), [], set()
    for name in (name for name in sizes if name.endswith(".json")):
        if sizes[name] > _MAX_RECORD_BYTES:
            return None
        line = archive.extractfile(name).read() + b"\n"
        record = parse_record(line)  # ManifestLineError is a ValueError
        sample = (record["key"], record["folder"])
        names = member_names(*sample, extension)
        if sample not in group or record.get(TAR_FIELD) != relative or names["json"] != name \
                or any(record.get(MEMBER_FIELDS[role]) != names[role] for role in ("clean", "degraded")) \
                or any(sizes.get(names[role]) != record.get(f"{role}_bytes") for role in ("clean", "degraded")):
            return None
        if sample in listed:
            if listed[sample] != line:
                return None
        elif all(hashlib.sha256(archive.extractfile(names[role]).read()).hexdigest() == record.get(f"{role}_sha256")
                 for role in ("clean", "degraded")):
            missing.append(line)  # a kill between the tar's rename and its manifest lines
        else:
            return None
        covered.update(names.values())
        samples.add(sample)
    return None if covered != sizes.keys() or not samples >= listed.keys() else missing


@dataclass
class _Group:
    """A tar being assembled: samples arrive in any order and are appended in plan order."""

    items: list[WorkItem]
    path: Path
    next: int = 0
    ready: dict[int, EncodedSample] = field(default_factory=dict)
    skipped: set[int] = field(default_factory=set)
    lines: list[bytes] = field(default_factory=list)
    tar: TarWriter | None = None


class WebDatasetLayoutWriter(BackgroundWriter):
    """Writes one shard's tars; the same interface as `dataset.writer.DatasetWriter` (submit, record_error, drain, close).

    Images are encoded on worker threads (the bytes equal the folders layout's); `submit` blocks while too many
    samples are being encoded. The first worker failure is raised by the next `submit`, `drain` or `close`.
    """

    def __init__(self, out_dir: str | Path, shard: ShardSpec, items: Sequence[WorkItem], samples_per_tar: int,
                 fmt: ImageFormat = "png", quality: int = 95, png_compress_level: int = 1, workers: int = 2) -> None:
        super().__init__(workers, "mdsd3-tar")
        self.layout = OutputLayout(out_dir, fmt)
        self.shard, self.fmt, self.quality, self.png_compress_level = shard, fmt, quality, png_compress_level
        self.extension = FORMAT_EXTENSIONS[fmt]
        self.written = self.errors = self.bytes_written = 0
        check_same_plan(self.layout.root, shard, items, samples_per_tar)
        finished = finished_groups(self.layout.root, shard, items, samples_per_tar, self.extension)
        self._listed = set(listed_tar_lines(self.layout.root, shard))
        self._groups: dict[int, _Group] = {}
        self._position: dict[Sample, tuple[int, int]] = {}
        self._remaining: dict[str, int] = defaultdict(int)
        for index, members in enumerate(groups_of(items, samples_per_tar)):
            path = tar_path(self.layout.root, shard, index)
            if index in finished:
                continue
            self._groups[index] = _Group(members, path)
            for position, item in enumerate(members):
                self._position[item.key, item.folder] = (index, position)
                self._remaining[item.key] += 1
        self._log = DatasetWriter(out_dir, shard.name, fmt, quality, png_compress_level, workers=1)
        restored = [line for index in sorted(finished) for line in finished[index]]
        if restored:
            self._log.append_manifest_lines(restored)
        self._clean: dict[str, Future[bytes]] = {}

    def submit(self, record: Mapping[str, Any], clean: np.ndarray, degraded: np.ndarray) -> None:
        """Queue one sample of this shard's plan (`record` needs `key` and `folder`)."""
        self._check_open()
        key, folder = record["key"], record["folder"]
        where = self._position.get((key, folder))
        if where is None:
            raise ValueError(f"sample key={key!r} folder={folder!r} is not an unfinished sample of {self.shard.name}")
        record_json(dict(record))  # a record that cannot be written fails here, in the caller
        with self._lock:
            clean_bytes = self._clean.get(key)
            if clean_bytes is None:
                clean_bytes = self._clean[key] = self._pool.submit(self._encode, clean.copy())
            self._remaining[key] -= 1
            if self._remaining[key] == 0:
                del self._clean[key]
        self._slots.acquire()
        self._start(self._write_sample, where, dict(record), clean_bytes, degraded.copy())

    def record_error(self, key: str | None, path: str | Path, reason: str) -> None:
        """Log a skipped input; its samples are left out of their tars."""
        self._log.record_error(key, path, reason)
        self.errors += 1
        with self._lock:
            touched = set()
            for (item_key, _), (group, position) in self._position.items():
                if item_key == key and group in self._groups:
                    self._groups[group].skipped.add(position)
                    touched.add(group)
            for group in sorted(touched):
                self._pump(group)

    def _release(self) -> None:
        """A tar whose samples did not all arrive is dropped (redone by the next run)."""
        for group in self._groups.values():
            if group.tar is not None:
                group.tar.abort()
        self._log.close()

    def _encode(self, pixels: np.ndarray) -> bytes:
        return encode_image(pixels, self.fmt, self.quality, self.png_compress_level)

    def _write_sample(self, where: tuple[int, int], record: dict[str, Any], clean: Future[bytes],
                      degraded: np.ndarray) -> None:
        try:
            degraded_bytes = self._encode(degraded)
            clean_bytes = clean.result()
            group, position = where
            names = member_names(record["key"], record["folder"], self.extension)
            record.update({TAR_FIELD: self.layout.relative(self._groups[group].path),
                           **{MEMBER_FIELDS[role]: name for role, name in names.items()},
                           **file_digest_fields("clean", *digest(clean_bytes)),
                           **file_digest_fields("degraded", *digest(degraded_bytes))})
            with self._lock:
                self._groups[group].ready[position] = EncodedSample(record, clean_bytes, degraded_bytes, self.extension)
                self._pump(group)
        except BaseException as exc:
            exc.add_note(f"while writing sample key={record['key']!r} folder={record['folder']!r}")
            raise
        finally:
            self._slots.release()

    def _pump(self, index: int) -> None:
        """Append the group's samples that are next in plan order; finish the tar when all are in (lock held)."""
        group = self._groups[index]
        while group.next < len(group.items):
            if group.next in group.ready:
                sample = group.ready.pop(group.next)
                if group.tar is None:
                    group.tar = TarWriter(group.path, self.layout.root)
                group.tar.write(sample)
                if (sample.key, sample.folder) not in self._listed:  # listed by a run killed while appending
                    group.lines.append(record_json(sample.record) + b"\n")
                self.bytes_written += len(sample.clean) + len(sample.degraded)
            elif group.next not in group.skipped:
                return
            group.next += 1
        if group.tar is not None:
            group.tar.close()
            self._log.append_manifest_lines(group.lines)
            self.written += group.tar.samples
        del self._groups[index]
