"""The one reader of a generate output's manifests (either layout): each record line as a `ManifestEntry` (the
record, where it is, its clean and degraded images as `ImageRef`s); each line that holds no usable record as a
`BadLine`, handed to the caller's `bad` (verify lists them, export refuses, evaluate and train count them,
resume skips them). Memory stays bounded whatever a manifest holds (a line over MAX_LINE_BYTES is never held)."""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdsd3_cli.dataset.manifest import MAX_LINE_BYTES, TAR_FIELD, ManifestLineError, open_regular, parse_record
from mdsd3_cli.dataset.names import MANIFEST_FOLDER, MANIFEST_SUFFIX
from mdsd3_cli.dataset.stored_images import ImageRef, record_image


@dataclass(frozen=True)
class BadLine:
    """A manifest line that holds no usable record, and why."""

    manifest: Path
    number: int
    line: bytes
    reason: str

    @property
    def where(self) -> str:
        return f"{self.manifest}:{self.number}"

    @property
    def blank(self) -> bool:
        return not self.line.strip()

    @property
    def unfinished(self) -> bool:
        """The last line of a manifest being appended (or a killed run's): not a record yet."""
        return not self.line.endswith(b"\n") and len(self.line) <= MAX_LINE_BYTES


@dataclass(frozen=True)
class ManifestEntry:
    """One record of a manifest: the parsed `record`, its `line` (bytes, newline included) at byte `offset` of
    line `number` of `manifest`, and its images in the dataset at `root`."""

    root: Path
    manifest: Path
    number: int
    offset: int
    line: bytes
    record: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.manifest}:{self.number}"

    @property
    def sample(self) -> tuple[str, str]:
        """(key, variant folder)."""
        return self.record["key"], self.record["folder"]

    @property
    def in_tar(self) -> bool:
        """A webdataset-layout record (its images are tar members)."""
        return TAR_FIELD in self.record

    @functools.cached_property
    def clean(self) -> ImageRef | None:
        """The clean image, or None when its path leaves the dataset folder."""
        return record_image(self.root, self.record, "clean")

    @functools.cached_property
    def degraded(self) -> ImageRef | None:
        """The degraded image, or None when its path leaves the dataset folder."""
        return record_image(self.root, self.record, "degraded")


def manifest_files(root: Path) -> list[Path]:
    """Every shard's manifest, in name order: regular files only (a link, folder or pipe there is never read)."""
    return sorted(path for path in Path(root).glob(f"{MANIFEST_FOLDER}/*{MANIFEST_SUFFIX}") if _regular(path))


def manifest_entries(
    root: Path,
    manifests: Sequence[Path] | None = None,
    check: Callable[[dict[str, Any]], object] | None = None,
    bad: Callable[[BadLine], None] | None = None,
) -> Iterator[ManifestEntry]:
    """The records of `manifests` (default: `manifest_files(root)`; a missing one or one that is not a regular
    file is not read), in file and line order. A line `parse_record` refuses, or whose record `check` refuses
    (raising ManifestLineError), goes to `bad` (default: skipped)."""
    for manifest in manifest_files(root) if manifests is None else [path for path in manifests if _regular(path)]:
        for number, offset, line in manifest_lines(manifest):
            try:
                record = parse_record(line)
                if check is not None:
                    check(record)
            except ManifestLineError as error:
                if bad is not None:
                    bad(BadLine(manifest, number, line, str(error)))
                continue
            yield ManifestEntry(Path(root), manifest, number, offset, line, record)


def manifest_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, line) of one manifest; a line over MAX_LINE_BYTES is cut to MAX_LINE_BYTES + 1
    bytes (which `parse_record` refuses) and the rest of it skipped, so memory stays bounded whatever the file
    holds."""
    with open_regular(path) as handle:
        number = offset = 0
        while line := handle.readline(MAX_LINE_BYTES + 1):
            number += 1
            length = len(line)
            if length > MAX_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := handle.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    length += len(rest)
                length += len(rest)
            yield number, offset, line
            offset += length


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
