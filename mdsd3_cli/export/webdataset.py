"""WebDataset tar shards: one sample per pair, `<sample>.clean.<ext>`, `<sample>.degraded.<ext>` and
`<sample>.json` (its manifest record), in a byte-for-byte deterministic tar."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mdsd3_cli.export.sample import EncodedSample, sample_key
from mdsd3_cli.util.atomic import AtomicFile
from mdsd3_cli.export.staging import StagedFolder

MEMBER_MTIME = 0
MEMBER_MODE = 0o644
EXPORT_TAR_PATTERN = "data-{index:06d}.tar"


def member_names(key: str, folder: str, extension: str) -> dict[str, str]:
    """Tar member names of one pair, by role (`clean`, `degraded`, `json`)."""
    stem = sample_key(key, folder)
    return {"clean": f"{stem}.clean.{extension}", "degraded": f"{stem}.degraded.{extension}", "json": f"{stem}.json"}


def record_json(record: dict[str, Any]) -> bytes:
    """The `.json` member of a sample: its record, keys sorted, ASCII."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")


class TarWriter:
    """One tar file, written under a temporary name and renamed when `close()`d (inside `root`, when given);
    members in `write` order.

    Members carry fixed metadata (mode 0644, mtime 0, uid/gid 0, no user names), so the same samples in the same
    order always give the same bytes.
    """

    def __init__(self, path: Path, root: Path | None = None) -> None:
        self.path = Path(path)
        self._file = AtomicFile(self.path, root)
        self._tar = tarfile.open(fileobj=self._file.file, mode="w", format=tarfile.PAX_FORMAT)
        self.samples = 0

    def write(self, sample: EncodedSample) -> None:
        """Append `sample`; its `.json` member is `sample.record` as is."""
        names = member_names(sample.key, sample.folder, sample.extension)
        for role, data in (("clean", sample.clean), ("degraded", sample.degraded),
                           ("json", record_json(sample.record))):
            self.add_member(names[role], data)
        self.samples += 1

    def add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), MEMBER_MTIME, MEMBER_MODE
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()
        self._file.commit()

    def abort(self) -> None:
        self._tar.close()
        self._file.discard()


class WebDatasetWriter:
    """A folder of tars `data-000000.tar, ...` of at most `samples_per_tar` samples each, appearing as a whole
    (with PARTIAL_EXPORT.json holding `partial`, when given)."""

    def __init__(self, destination: Path, samples_per_tar: int, partial: Mapping[str, Any] | None = None) -> None:
        if samples_per_tar < 1:
            raise ValueError(f"samples per tar must be at least 1, got {samples_per_tar}")
        self.samples_per_tar = samples_per_tar
        self._partial = partial
        self._folder = StagedFolder(destination)
        self._tar: TarWriter | None = None
        self.tars = 0

    def write(self, sample: EncodedSample) -> None:
        if self._tar is None:
            self._tar = TarWriter(self._folder.stage / EXPORT_TAR_PATTERN.format(index=self.tars))
            self.tars += 1
        self._tar.write(sample)
        if self._tar.samples == self.samples_per_tar:
            self._tar.close()
            self._tar = None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._partial is not None:
            self._folder.record_partial(self._partial)
        self._folder.commit()

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.abort()
            self._tar = None
        self._folder.discard()

    def pattern(self) -> str:
        """The brace pattern naming every tar, as `webdataset.WebDataset` takes it."""
        last = max(self.tars - 1, 0)
        return str(self._folder.path / f"data-{{000000..{last:06d}}}.tar")
