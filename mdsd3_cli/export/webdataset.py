"""WebDataset tar shards: one sample per key (the webdataset and img2dataset convention: one key, several
extensions) holding the clean image once and every variant's degraded image: `<key>.clean.<ext>`,
`<key>.<folder>.degraded.<ext>` per variant folder, and `<key>.json` (each folder's manifest record, by folder),
in a byte-for-byte deterministic tar."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdsd3_cli.export.sample import EncodedSample, flat_key
from mdsd3_cli.export.staging import StagedFolder
from mdsd3_cli.util.atomic import AtomicFile, naming

MEMBER_MTIME = 0
MEMBER_MODE = 0o644
EXPORT_TAR_PATTERN = "data-{index:06d}.tar"


@dataclass(frozen=True)
class KeyMembers:
    """Tar member names of one key's sample."""

    clean: str
    degraded: dict[str, str]
    """Variant folder -> its degraded image's member, in folder order."""
    json: str

    def names(self) -> list[str]:
        """Every member, in the order a tar holds them."""
        return [self.clean, *self.degraded.values(), self.json]


def key_members(key: str, folders: Sequence[str], extension: str) -> KeyMembers:
    """The members of `key`'s sample with `folders` (folder names are escaped like keys, so hold no dot and no
    member name is another's: `photo.clean.png`, `photo.rain.degraded.png`, `photo.json`)."""
    stem = flat_key(key)
    return KeyMembers(
        f"{stem}.clean.{extension}",
        {folder: f"{stem}.{flat_key(folder)}.degraded.{extension}" for folder in folders},
        f"{stem}.json",
    )


def record_json(record: Mapping[str, Any]) -> bytes:
    """A record (or a key's records by folder) as JSON: keys sorted, ASCII, compact."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def key_json(samples: Sequence[EncodedSample]) -> bytes:
    """The `.json` member of a key's sample: each folder's record, by folder."""
    return record_json({sample.folder: sample.record for sample in samples})


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

    def write_key(self, samples: Sequence[EncodedSample]) -> None:
        """Append one key's sample: the clean image (of the first pair: a key's pairs share it), each pair's
        degraded image in the given order, then the records (`key_json`)."""
        first = samples[0]
        members = key_members(first.key, [sample.folder for sample in samples], first.extension)
        self.add_member(members.clean, first.clean)
        for sample in samples:
            self.add_member(members.degraded[sample.folder], sample.degraded)
        self.add_member(members.json, key_json(samples))
        self.samples += 1

    def add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), MEMBER_MTIME, MEMBER_MODE
        try:
            self._tar.addfile(info, io.BytesIO(data))
        except OSError as error:
            raise naming(error, self.path) from None

    def close(self) -> None:
        try:
            self._tar.close()
        except OSError as error:
            self._file.discard()
            raise naming(error, self.path) from None
        self._file.commit()

    def abort(self) -> None:
        """Remove the temp file; never raises for the tar's own errors (its end blocks on a full disk)."""
        try:
            self._tar.close()
        except OSError:
            pass
        finally:
            self._file.discard()


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
