"""Where a generate output's images are stored, in either layout: a file (folders) or a member of a tar
(webdataset). `evaluate`, `preview` and `train` read records' images through `record_image(...).open()`."""

from __future__ import annotations

import functools
import io
import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdsd3_cli.dataset.manifest import MEMBER_FIELDS, TAR_FIELD


@dataclass(frozen=True)
class ImageRef:
    """An image file, or (webdataset layout) the member `member` of the tar file `path`."""

    path: Path
    member: str | None = None

    def __str__(self) -> str:
        return str(self.path) if self.member is None else f"{self.path}:{self.member}"

    def exists(self) -> bool:
        """The file (or the tar holding the member) exists; a missing member shows only when opened."""
        return self.path.is_file()

    @property
    def name(self) -> str:
        """The file's or the member's name (its suffix is the image format's)."""
        return self.path.name if self.member is None else self.member

    def read_bytes(self) -> bytes:
        """The encoded image. FileNotFoundError when the file or tar is missing, KeyError when the tar has no
        such member, tarfile.TarError for a damaged tar."""
        if self.member is None:
            return self.path.read_bytes()
        archive = _open_tar(self.path, self.path.stat().st_mtime_ns, os.getpid(), threading.get_ident())
        member = archive.extractfile(self.member)
        if member is None:  # a directory or link entry
            raise KeyError(self.member)
        return member.read()

    def open(self) -> Path | io.BytesIO:
        """Something `PIL.Image.open` reads: the file's path, or the member's bytes (errors as `read_bytes`)."""
        return self.path if self.member is None else io.BytesIO(self.read_bytes())


@functools.lru_cache(maxsize=16)
def _open_tar(path: Path, modified_ns: int, pid: int, thread: int) -> tarfile.TarFile:
    """An open tar with its member index: a reader takes one tar's samples in a row. `modified_ns` keys the
    cache (a rewritten tar is opened afresh); so do `pid` and `thread`, as a tar handle's file offset must not
    be shared by a forked data-loader process or by reader threads."""
    archive = tarfile.open(path)
    archive.getmembers()
    return archive


def _inside(root: Path, relative: object) -> Path | None:
    """root/relative when `relative` is a relative path string that stays inside root, else None."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        return None
    target = root / relative
    return target if target.resolve().is_relative_to(root.resolve()) else None


def record_image(root: Path, record: dict[str, Any], role: str) -> ImageRef | None:
    """Where a parsed manifest record's `role` ("clean" or "degraded") image is, or None when its path would
    leave the dataset folder `root`."""
    if TAR_FIELD in record:
        archive = _inside(root, record[TAR_FIELD])
        return None if archive is None else ImageRef(archive, record[MEMBER_FIELDS[role]])
    path = _inside(root, record[role])
    return None if path is None else ImageRef(path)
