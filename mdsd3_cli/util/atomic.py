"""Safe file output: atomic replace through exclusively created temp files, appends that refuse links.

Every file mdsd3 writes goes through here. A temp file `.<name>.tmp` is created with
`O_CREAT|O_EXCL|O_NOFOLLOW` in the target folder (whatever is found at that name, a killed run's leftover or a
planted link, is unlinked first: the name is removed, its target never opened), written, fsynced and renamed
onto the final name (a rename replaces a link found there instead of writing through it). Files several
processes may write at once get a unique temp name instead. Files get the umask's modes (0666 & ~umask), like
any file the user creates. Errors name the path they concern.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

WriteFunction = Callable[[BinaryIO], object]
_CREATE_ATTEMPTS = 3


class UnsafeOutputError(OSError):
    """An output path is a link, a shared (hard-linked) or non-regular file, or leads outside its root."""


@functools.cache
def file_mode() -> int:
    """0666 minus this process's umask: the mode `open()` would give a new file."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # no /proc (or an old kernel): read the umask by setting it back at once
    os.umask(umask)
    return 0o666 & ~umask


def ensure_folder(folder: Path, root: Path | None = None) -> None:
    """Create `folder` (and parents); with `root`, refuse when it resolves outside `root` (a linked sub folder)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _naming(error, folder) from None
    if root is not None and not folder.resolve().is_relative_to(Path(root).resolve()):
        raise UnsafeOutputError(f"{folder} leads outside the output folder {root} (a symbolic link?); "
                                "refusing to write there")


def atomic_write(path: Path, content: bytes | WriteFunction, root: Path | None = None, shared: bool = False) -> int:
    """Replace `path` with `content` (bytes, or a function writing to a binary file); returns the bytes written.

    `path` is never seen partial; a link at `path` is replaced, never followed. With `root`, the folder of
    `path` must lie inside `root`. `shared`: other processes may write `path` at the same time (unique temp name).
    """
    path = Path(path)
    ensure_folder(path.parent, root)
    try:
        descriptor, temp_name = _unique_temp(path) if shared else _exclusive_temp(path)
    except OSError as error:
        raise _naming(error, path) from None
    try:
        os.fchmod(descriptor, file_mode())
        with os.fdopen(descriptor, "wb") as file:
            if isinstance(content, (bytes, bytearray, memoryview)):
                file.write(content)
            else:
                content(file)
            file.flush()
            os.fsync(file.fileno())
            size = file.tell()
        os.replace(temp_name, path)
    except BaseException as error:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError):
            raise _naming(error, path) from None
        raise
    return size


class AtomicFile:
    """A file written over time (a tar shard): `.<name>.tmp`, created as `atomic_write` creates it, open in
    `file`; `commit()` fsyncs and renames it onto `path`, `discard()` removes it. `path` is never seen partial."""

    def __init__(self, path: Path, root: Path | None = None) -> None:
        self.path = Path(path)
        ensure_folder(self.path.parent, root)
        try:
            descriptor, self._temp = _exclusive_temp(self.path)
            os.fchmod(descriptor, file_mode())
        except OSError as error:
            raise _naming(error, self.path) from None
        self.file: BinaryIO = os.fdopen(descriptor, "wb")

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self._temp, self.path)
        except OSError as error:
            self.discard()
            raise _naming(error, self.path) from None

    def discard(self) -> None:
        self.file.close()
        try:
            os.unlink(self._temp)
        except FileNotFoundError:
            pass


def _unique_temp(path: Path) -> tuple[int, str]:
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def _exclusive_temp(path: Path) -> tuple[int, str]:
    """Create `.<name>.tmp` exclusively, unlinking whatever holds that name (never following it)."""
    temp = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_CREATE_ATTEMPTS):
        try:
            return os.open(temp, flags, 0o600), str(temp)
        except FileExistsError:
            os.unlink(temp)
    raise UnsafeOutputError(f"{temp} keeps reappearing; another process is writing {path}")


def open_append(path: Path, root: Path | None = None, truncate: bool = False) -> BinaryIO:
    """Open `path` for appending (and reading), creating it; refuse a link, a non-regular or a hard-linked file.

    `truncate` empties it first (after the checks, so a file shared through a hard link is never cut).
    """
    path = Path(path)
    ensure_folder(path.parent, root)
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags, 0o666)
    except OSError as error:
        if path.is_symlink():
            raise UnsafeOutputError(f"{path} is a symbolic link; refusing to write through it") from None
        raise _naming(error, path) from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise UnsafeOutputError(f"{path} is not a regular file; refusing to write to it")
        if status.st_nlink > 1:
            raise UnsafeOutputError(f"{path} has other hard links; refusing to write to a file shared with "
                                    "another path")
        if truncate:
            os.ftruncate(descriptor, 0)
        return os.fdopen(descriptor, "a+b")
    except BaseException:
        os.close(descriptor)
        raise


def fresh_folder(path: Path) -> None:
    """Remove whatever is at `path` (a link is removed, never followed) and create an empty folder there."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    try:
        path.mkdir()
    except OSError as error:
        raise _naming(error, path) from None


def _naming(error: OSError, path: Path) -> OSError:
    """`error` with `path` as its file name when it names none (e.g. ENOSPC on a write)."""
    if error.filename is not None or isinstance(error, UnsafeOutputError):
        return error
    return type(error)(error.errno, error.strerror or str(error), str(path))
