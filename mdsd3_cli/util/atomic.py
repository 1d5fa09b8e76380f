"""Safe file output: atomic replace through exclusively created temp files, appends that refuse links.

Every file mdsd3 writes goes through here. A temp file `.<name>.<random>.tmp`, unique to its writer, is created
with `O_CREAT|O_EXCL|O_NOFOLLOW` (`tempfile.mkstemp`) in the target folder, written, fsynced and renamed onto the
final name (a rename replaces a link found there instead of writing through it). A writer that owns its name
(`shared=False`, the default: the caller holds the output's lock) also removes a killed run's leftover temp files
of that name (unlinked, never followed): `.<name>.tmp` (the fixed name of older versions), and the
`.<name>.<random>.tmp` that were there when this process first wrote into the folder. Files get the umask's
modes (0666 & ~umask), like any file the user creates. Errors name the path they concern; a full disk (or a
quota, or `ulimit -f`) is an `OutputSpaceError` that says so.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

WriteFunction = Callable[[BinaryIO], object]
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\.(?P<name>.+?)(?:\.(?P<random>[a-z0-9_]{8}))?\.tmp", re.DOTALL)
"""A temp file's name: `.<name>.tmp` (written before temp names were unique) or `.<name>.<random>.tmp` (mkstemp)."""
SPACE_ERRORS = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded (the disk is full for this user)",
    errno.EFBIG: "the file is larger than this process may write (file size limit, `ulimit -f`)",
}


class UnsafeOutputError(OSError):
    """An output path is a link, a shared (hard-linked) or non-regular file, or leads outside its root."""


class OutputSpaceError(OSError):
    """A write failed for lack of space: a full disk, a quota, or the file size limit. Names the path."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def space_error(path: str | os.PathLike, code: int = errno.ENOSPC) -> OutputSpaceError:
    """The error for a write to `path` that failed with `code` (one of SPACE_ERRORS)."""
    return OutputSpaceError(code, SPACE_ERRORS[code], str(path))


@functools.cache
def current_umask() -> int:
    """This process's umask, read once without changing it where /proc allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # no /proc (or an old kernel): read the umask by setting it back at once
    os.umask(umask)
    return umask


def file_mode() -> int:
    """0666 minus this process's umask: the mode `open()` would give a new file."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """0777 minus this process's umask: the mode `mkdir` would give a new folder."""
    return 0o777 & ~current_umask()


def ensure_folder(folder: Path, root: Path | None = None) -> None:
    """Create `folder` (and parents); with `root`, refuse when it resolves outside `root` (a linked sub folder)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise naming(error, folder) from None
    if root is not None and not folder.resolve().is_relative_to(Path(root).resolve()):
        raise UnsafeOutputError(
            f"{folder} leads outside the output folder {root} (a symbolic link?); refusing to write there"
        )


def atomic_write(path: Path, content: bytes | WriteFunction, root: Path | None = None, shared: bool = False) -> int:
    """Replace `path` with `content` (bytes, or a function writing to a binary file); returns the bytes written.

    `path` is never seen partial; a link at `path` is replaced, never followed. With `root`, the folder of
    `path` must lie inside `root`. `shared`: other processes may write `path` at the same time (leftover temp
    files of `path` are then left alone).
    """
    path = Path(path)
    ensure_folder(path.parent, root)
    try:
        if not shared:
            _LEFTOVERS.remove(path)
        descriptor, temp_name = _unique_temp(path)
    except OSError as error:
        raise naming(error, path) from None
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
            raise naming(error, path) from None
        raise
    return size


def atomic_write_together(files: Mapping[Path, bytes]) -> None:
    """Write every file of `files` (path -> bytes) as `atomic_write` does, all or none: each is written and
    fsynced to its temp file first, and only then are they renamed. A failure (a full disk) leaves every path as
    it was."""
    pending: list[AtomicFile] = []
    try:
        for path, data in files.items():
            pending.append(AtomicFile(path))
            pending[-1].write(data)
            pending[-1].sync()
    except BaseException:
        for file in pending:
            file.discard()
        raise
    for file in pending:
        file.commit()


class AtomicFile:
    """A file written over time (a tar shard): a temp file created as `atomic_write` creates it (a killed run's
    leftovers of `path` removed), open in `file`; `commit()` fsyncs and renames it onto `path`, `discard()`
    removes it (and never raises). `path` is never seen partial; errors name `path`."""

    def __init__(self, path: Path, root: Path | None = None) -> None:
        self.path = Path(path)
        ensure_folder(self.path.parent, root)
        try:
            _LEFTOVERS.remove(self.path)
            descriptor, self._temp = _unique_temp(self.path)
            os.fchmod(descriptor, file_mode())
        except OSError as error:
            raise naming(error, self.path) from None
        self.file: BinaryIO = os.fdopen(descriptor, "wb")

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self._temp, self.path)
        except OSError as error:
            self.discard()
            raise naming(error, self.path) from None

    def write(self, data: bytes) -> None:
        """Append `data` to the temp file; an OSError names `path` (a full disk says so)."""
        try:
            self.file.write(data)
        except OSError as error:
            raise naming(error, self.path) from None

    def sync(self) -> None:
        """Flush and fsync what is written so far (a full disk shows here at the latest)."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as error:
            raise naming(error, self.path) from None

    def discard(self) -> None:
        try:
            self.file.close()  # flushing what is buffered may fail again on a full disk
        except OSError:
            pass
        try:
            os.unlink(self._temp)
        except FileNotFoundError:
            pass


def _unique_temp(path: Path) -> tuple[int, str]:
    """`.<name>.<random>.tmp` beside `path`, created exclusively (O_EXCL, O_NOFOLLOW, mode 0600)."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)


def temp_target(name: str) -> list[str]:
    """The file names a temp file called `name` may have been writing ([] when `name` is no temp name):
    `.a.png.tmp` -> a.png; `.a.png.x1y2z3w4.tmp` -> a.png, or a.png.x1y2z3w4 written under the old fixed name."""
    match = _TEMP_NAME.fullmatch(name)
    if match is None:
        return []
    if match["random"] is None:
        return [match["name"]]
    return [match["name"], f"{match['name']}.{match['random']}"]


def leftover_temps(paths: list[Path]) -> list[Path]:
    """The temp files (any writer's, this process's included) of `paths` found now: one listing per folder."""
    wanted: dict[Path, set[str]] = {}
    for path in paths:
        wanted.setdefault(path.parent, set()).add(path.name)
    found = []
    for folder, names in wanted.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        found += [folder / entry for entry in entries if any(target in names for target in temp_target(entry))]
    return found


class _Leftovers:
    """Temp files of killed runs, by folder and target name, as listed when this process first wrote into each
    folder (one listing per folder, then one lookup per write)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folders: dict[str, dict[str, list[str]]] = {}

    def remove(self, path: Path) -> None:
        """Unlink the leftover temp files of `path` (a link is removed, never followed); the old fixed name
        `.<name>.tmp` is checked at every call."""
        folder = os.path.abspath(path.parent)
        with self._lock:
            if folder not in self._folders:
                self._folders[folder] = self._list(folder)
            leftovers = {*self._folders[folder].pop(path.name, []), f".{path.name}{TEMP_SUFFIX}"}
        for name in leftovers:
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass  # also listed under its other possible target name

    @staticmethod
    def _list(folder: str) -> dict[str, list[str]]:
        by_target: dict[str, list[str]] = {}
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(TEMP_SUFFIX) and not entry.is_dir(follow_symlinks=False):
                    for target in temp_target(entry.name):
                        by_target.setdefault(target, []).append(entry.name)
        return by_target


_LEFTOVERS = _Leftovers()


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
        raise naming(error, path) from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise UnsafeOutputError(f"{path} is not a regular file; refusing to write to it")
        if status.st_nlink > 1:
            raise UnsafeOutputError(
                f"{path} has other hard links; refusing to write to a file shared with another path"
            )
        if truncate:
            os.ftruncate(descriptor, 0)
        raw = _NamedFileIO(descriptor, path)
    except BaseException:
        os.close(descriptor)
        raise
    return io.BufferedRandom(raw)


class _NamedFileIO(io.FileIO):
    """An appending raw file whose write errors name its path (a full disk says so), however deep the caller."""

    def __init__(self, descriptor: int, path: Path) -> None:
        super().__init__(descriptor, "a+")
        self.path = path

    def write(self, data) -> int:
        try:
            return super().write(data)
        except OSError as error:
            raise naming(error, self.path) from None


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
        raise naming(error, path) from None


def naming(error: OSError, path: str | os.PathLike) -> OSError:
    """`error` with `path` as its file name when it names none; a full disk (quota, file size limit) becomes an
    `OutputSpaceError` naming `path` that says so."""
    if isinstance(error, (UnsafeOutputError, OutputSpaceError)):
        return error
    if error.errno in SPACE_ERRORS:
        return space_error(error.filename or path, error.errno)
    if error.filename is not None:
        return error
    return type(error)(error.errno, error.strerror or str(error), str(path))
