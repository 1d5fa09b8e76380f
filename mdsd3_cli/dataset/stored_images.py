"""Where a generate output's images are stored, in either layout: a file (folders) or a member of a tar
(webdataset). `evaluate`, `preview` and `train` decode records' images (`reader.ManifestEntry.clean`/`degraded`,
made by `record_image`) through `ImageRef.read_rgb()`: one decoding path (`images.decode_rgb`) for every reader."""

from __future__ import annotations

import contextlib
import functools
import os
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from mdsd3_cli.dataset.manifest import MEMBER_FIELDS, TAR_FIELD, open_regular
from mdsd3_cli.util.images import DEFAULT_MAX_PIXELS, ImageError, decode_rgb

MAX_IMAGE_BYTES = DEFAULT_MAX_PIXELS * 8 + (16 << 20)
"""Largest image file (or tar member) read: an uncompressed 16-bit RGBA image at the decompression-bomb pixel limit,
plus 16 MiB of metadata. A larger one is refused by its size, before anything is read."""


class ImageSizeError(OSError):
    """A stored image whose size (from the file system or the tar header) is not the recorded one, or over
    MAX_IMAGE_BYTES: refused before it is read."""


def too_large(size: int) -> str | None:
    """Why an image file or member of `size` bytes is not read (over MAX_IMAGE_BYTES), or None."""
    if size > MAX_IMAGE_BYTES:
        return f"{size} bytes, more than the largest image file read ({MAX_IMAGE_BYTES})"
    return None


@dataclass(frozen=True)
class ImageRef:
    """An image file, or (webdataset layout) the member `member` of the tar file `path`; `recorded` is its size in
    the manifest (field name, bytes), where there is one."""

    path: Path
    member: str | None = None
    recorded: tuple[str, int] | None = None

    def __str__(self) -> str:
        return str(self.path) if self.member is None else f"{self.path}:{self.member}"

    def exists(self) -> bool:
        """The file (or the tar holding the member) exists; a missing member shows only when opened."""
        return self.path.is_file()

    @property
    def name(self) -> str:
        """The file's or the member's name (its suffix is the image format's)."""
        return self.path.name if self.member is None else self.member

    @contextlib.contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """The encoded image as a seekable stream, once its size (st_size, or the tar header's) is found to be the
        recorded one and at most MAX_IMAGE_BYTES. FileNotFoundError when the file or tar is missing, ImageSizeError
        for another size, OSError when it is not a regular file, KeyError when the tar has no such member or it is
        not a regular file (a link or a folder), tarfile.TarError for a damaged tar."""
        if self.member is None:
            with open_regular(self.path) as file:
                self._check_size(os.fstat(file.fileno()).st_size)
                yield file
            return
        archive = _open_tar(self.path, self.path.stat().st_mtime_ns, os.getpid(), threading.get_ident())
        member = archive.getmember(self.member)
        if not member.isfile():
            raise KeyError(self.member)
        self._check_size(member.size)
        yield archive.extractfile(member)

    def _check_size(self, size: int) -> None:
        if self.recorded is not None and size != self.recorded[1]:
            raise ImageSizeError(f"{size} bytes, the manifest's {self.recorded[0]} is {self.recorded[1]}")
        problem = too_large(size)
        if problem is not None:
            raise ImageSizeError(problem)

    def read_bytes(self) -> bytes:
        """The encoded image (errors as `open`)."""
        with self.open() as stream:
            return stream.read()

    def read_rgb(self, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1) -> Image.Image:
        """The decoded image as RGB (`images.decode_rgb`, from the stream: EXIF orientation, alpha over white,
        16-bit and float scaled); ImageError with the reason for anything unusable (missing, not a regular file or
        member, another size than recorded or over MAX_IMAGE_BYTES, damaged tar, not an image, a side under
        `min_side`, over `max_pixels`)."""
        try:
            with self.open() as stream:
                return decode_rgb(stream, max_pixels, min_side)
        except FileNotFoundError:
            raise ImageError("file not found") from None
        except KeyError:
            raise ImageError("not a regular file member of its tar (missing, a link or a folder)") from None
        except tarfile.TarError as error:
            raise ImageError(f"damaged tar: {error}") from None
        except ImageSizeError as error:
            raise ImageError(str(error)) from None
        except OSError as error:
            raise ImageError(f"cannot read: {error}") from None


@functools.lru_cache(maxsize=16)
def _open_tar(path: Path, modified_ns: int, pid: int, thread: int) -> tarfile.TarFile:
    """An open tar with its member index: a reader takes one tar's samples in a row. `modified_ns` keys the
    cache (a rewritten tar is opened afresh); so do `pid` and `thread`, as a tar handle's file offset must not
    be shared by a forked data-loader process or by reader threads."""
    archive = tarfile.open(fileobj=open_regular(path), mode="r:")  # uncompressed, as mdsd3 writes them
    archive.getmembers()
    return archive


def inside_dataset(root: Path, relative: object) -> Path | None:
    """root/relative when `relative` is a relative path string that stays inside root (links resolved), else None
    (also for a NUL byte)."""
    if not isinstance(relative, str) or not relative or "\0" in relative or os.path.isabs(relative):
        return None
    target = Path(root) / relative
    try:
        return target if target.resolve().is_relative_to(Path(root).resolve()) else None
    except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13)
        return None


def record_image(root: Path, record: dict[str, Any], role: str) -> ImageRef | None:
    """Where a parsed manifest record's `role` ("clean" or "degraded") image is, with its recorded size
    (`<role>_bytes`), or None when its path would leave the dataset folder `root`."""
    size = record.get(f"{role}_bytes")
    recorded = (f"{role}_bytes", size) if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None
    if TAR_FIELD in record:  # without a recorded size (an older manifest), only MAX_IMAGE_BYTES applies
        archive = inside_dataset(root, record[TAR_FIELD])
        return None if archive is None else ImageRef(archive, record[MEMBER_FIELDS[role]], recorded)
    path = inside_dataset(root, record[role])
    return None if path is None else ImageRef(path, recorded=recorded)
