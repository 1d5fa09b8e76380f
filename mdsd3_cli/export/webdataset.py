"""The WebDataset export: a folder of tars in the layout's tar format (`dataset.tar_format`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mdsd3_cli.dataset.tar_format import EncodedSample, TarWriter
from mdsd3_cli.export.sample import ExportTarget
from mdsd3_cli.export.staging import StagedFolder

EXPORT_TAR_PATTERN = "data-{index:06d}.tar"
DEFAULT_KEYS_PER_TAR = 200
"""About 1 GB per tar at 512 px PNG with 6 variants."""


class WebDatasetWriter:
    """A folder of tars `data-000000.tar, ...` of at most `keys_per_tar` samples (keys) each, appearing as a whole
    (with PARTIAL_EXPORT.json holding `partial`, when given). Pairs arrive grouped by key (`export` sorts them)."""

    def __init__(self, destination: Path, keys_per_tar: int, partial: Mapping[str, Any] | None = None) -> None:
        if keys_per_tar < 1:
            raise ValueError(f"keys per tar must be at least 1, got {keys_per_tar}")
        self.keys_per_tar = keys_per_tar
        self._partial = partial
        self._folder = StagedFolder(destination)
        self._tar: TarWriter | None = None
        self._key: list[EncodedSample] = []
        self.tars = 0

    @classmethod
    def open(cls, target: ExportTarget) -> WebDatasetWriter:
        return cls(target.destination, target.per_file or DEFAULT_KEYS_PER_TAR, target.partial)

    def write(self, sample: EncodedSample) -> None:
        if self._key and self._key[0].key != sample.key:
            self._write_key()
        self._key.append(sample)

    def _write_key(self) -> None:
        if self._tar is None:
            self._tar = TarWriter(self._folder.stage / EXPORT_TAR_PATTERN.format(index=self.tars))
            self.tars += 1
        self._tar.write_key(self._key)
        self._key = []
        if self._tar.samples == self.keys_per_tar:
            self._tar.close()
            self._tar = None

    def close(self) -> None:
        if self._key:
            self._write_key()
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._partial is not None:
            self._folder.record_partial(self._partial)
        self._folder.commit()

    def abort(self) -> None:
        try:
            if self._tar is not None:
                self._tar.abort()
                self._tar = None
        finally:
            self._folder.discard()

    def pattern(self) -> str:
        """The brace pattern naming every tar, as `webdataset.WebDataset` takes it."""
        last = max(self.tars - 1, 0)
        return str(self._folder.path / f"data-{{000000..{last:06d}}}.tar")

    def how_to_read(self) -> str:
        return f'webdataset.WebDataset("{self.pattern()}")'
