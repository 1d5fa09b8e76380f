"""The tar of the webdataset layout (and of a WebDataset export): one sample per key (the webdataset and
img2dataset convention: one key, several extensions) holding the clean image once and every variant's degraded
image: `<key>.clean.<ext>`, `<key>.<folder>.degraded.<ext>` per variant folder, and `<key>.json` (each folder's
manifest record, by folder), in a byte-for-byte deterministic tar."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mdsd3_cli.util.atomic import AtomicFile, naming

MEMBER_MTIME = 0
MEMBER_MODE = 0o644


@dataclass(frozen=True)
class EncodedSample:
    """One (key, variant folder) pair as file bytes, with its manifest record."""

    record: dict[str, Any]
    clean: bytes
    degraded: bytes
    extension: str
    """Image file extension without the dot (png, jpg, webp)."""
    clean_shape: tuple[int, int, int] | None = None
    degraded_shape: tuple[int, int, int] | None = None
    """(height, width, channels) of each image, from its header (export fills them; BasicSR's meta_info needs them)."""

    @property
    def key(self) -> str:
        return self.record["key"]

    @property
    def folder(self) -> str:
        return self.record["folder"]


def flat_key(name: str) -> str:
    """`name` as an ASCII key without dots or spaces (WebDataset and BasicSR split names at the first dot).

    URL-style escaping keeps letters, digits, `_-~/` and escapes everything else, dots included (`.` -> %2E),
    so different names never share a key: `sub/img.v2 x` -> `sub/img%2Ev2%20x`.
    """
    return quote(name, safe="/").replace(".", "%2E")


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
