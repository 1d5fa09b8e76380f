"""A whole output folder built in a private staging folder beside its final name and renamed onto that name only
when complete, so a killed export never leaves something that looks finished (single files: `atomic.AtomicFile`).

Guarantees: one writer per destination (a kernel lock on `.<name>.mdsd3-export.lock` beside it, taken without
waiting); the staging folder is created exclusively under a unique name (`.<name>.<random>.partial`) and holds an
owner marker while it is built; only the staging folder this process created is ever deleted; the final rename
never replaces anything that appeared at the destination meanwhile.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mdsd3_cli.util.atomic import atomic_write

STAGE_SUFFIX = ".partial"
OWNER_MARKER = ".mdsd3-export-staging"
"""A file inside a staging folder while it is built: its writer's PID (a killed export's leftover is recognisable
and safe to delete by hand; mdsd3 never deletes a staging folder it did not create in this process)."""
PARTIAL_FILE = "PARTIAL_EXPORT.json"
"""In a folder export made with --partial: why it is partial and what was left out."""
LOCK_SUFFIX = ".mdsd3-export.lock"
LOCK_CONTENT = b"mdsd3 export lock\n"
_LOCK_ATTEMPTS = 5
_RENAME_NOREPLACE = 1


class DestinationExistsError(FileExistsError):
    """The final name is taken; a finished output is never replaced."""


class DestinationBusyError(OSError):
    """Another export holds the destination's lock."""


def lock_path(destination: Path) -> Path:
    """The lock file of `destination` (a sibling)."""
    return destination.with_name(f".{destination.name}{LOCK_SUFFIX}")


class DestinationLock:
    """An exclusive, non-blocking `flock` on `lock_path(destination)`, removed by its holder on `release()`.

    A holder unlinks the file while still holding it, and a taker checks after locking that the file it locked is
    still the one at that name, so two processes can never both hold the lock of one destination. A file at the
    lock's name that mdsd3 did not write (a link, a non-regular or non-empty foreign file) is refused, never
    removed. A kill -9 leaves the file unlocked; the next export takes it over.
    """

    def __init__(self, destination: Path) -> None:
        self.destination = destination
        self.path = lock_path(destination)
        self._descriptor: int | None = None
        for _ in range(_LOCK_ATTEMPTS):
            descriptor = self._open()
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = os.pread(descriptor, 64, 0).decode("ascii", "replace").split("\n")[1:2]
                os.close(descriptor)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    pid = f" (PID {holder[0]})" if holder and holder[0] else ""
                    raise DestinationBusyError(f"another export is writing {destination}{pid}; wait for it to "
                                               "finish or choose another destination") from None
                raise
            if self._still_at_path(descriptor):
                os.ftruncate(descriptor, 0)
                os.pwrite(descriptor, LOCK_CONTENT + f"{os.getpid()}\n".encode("ascii"), 0)
                self._descriptor = descriptor
                return
            os.close(descriptor)  # its holder removed it between our open and lock: take the new one
        raise DestinationBusyError(f"{self.path} keeps changing; another export is writing {destination}")

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            descriptor = os.open(self.path, flags, 0o644)
        except OSError:
            if os.path.islink(self.path):
                raise DestinationBusyError(f"{self.path} (the lock of {self.destination}) is a symbolic link that "
                                           "mdsd3 did not make; remove it") from None
            raise
        status = os.fstat(descriptor)  # st_nlink 0: its holder just removed it (the lock then fails or is retried)
        foreign = (not stat.S_ISREG(status.st_mode) or status.st_nlink > 1
                   or (status.st_size and not os.pread(descriptor, len(LOCK_CONTENT), 0) == LOCK_CONTENT))
        if foreign:
            os.close(descriptor)
            raise DestinationBusyError(f"{self.path} (the lock of {self.destination}) is a file mdsd3 did not write; "
                                       "remove it or choose another destination")
        return descriptor

    def _still_at_path(self, descriptor: int) -> bool:
        try:
            current = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(descriptor)
        return (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        if self._descriptor is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: no one else can have locked this file
        except FileNotFoundError:
            pass
        os.close(self._descriptor)
        self._descriptor = None


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename `source` onto `target`, failing with FileExistsError when `target` exists, atomically where the
    kernel can (Linux renameat2 RENAME_NOREPLACE); elsewhere a check just before the rename."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        at_cwd = -100
        if renameat2(at_cwd, os.fsencode(source), at_cwd, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: the file system cannot do it
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def _renameat2():
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    function = getattr(ctypes.CDLL(library, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function


class StagedFolder:
    """A folder built in a private staging folder beside `path` and renamed onto `path` by `commit()`.

    `path` must not exist (a finished folder is never replaced) and no other export may be writing it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser().absolute()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = DestinationLock(self.path)
        try:
            if os.path.lexists(self.path):
                raise DestinationExistsError(f"{self.path} exists; remove it or choose another destination")
            self.stage = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=STAGE_SUFFIX,
                                               dir=self.path.parent))
        except BaseException:
            self._lock.release()
            raise
        self._owned = True
        (self.stage / OWNER_MARKER).write_text(f"{os.getpid()}\n{self.path}\n", encoding="utf-8")

    def record_partial(self, partial: Mapping[str, Any]) -> None:
        """Write PARTIAL_FILE (what `partial` says) into the folder."""
        atomic_write(self.stage / PARTIAL_FILE, json.dumps(dict(partial), indent=2, sort_keys=True).encode("utf-8"),
                     root=self.stage)

    def commit(self) -> None:
        (self.stage / OWNER_MARKER).unlink()
        try:
            rename_no_replace(self.stage, self.path)
        except FileExistsError:
            self._owned = False  # keep the finished result
            self._lock.release()
            raise DestinationExistsError(f"{self.path} appeared while it was being written (not by mdsd3 export); "
                                         f"the finished result is left in {self.stage}") from None
        self._owned = False
        self._lock.release()

    def discard(self) -> None:
        """Remove the staging folder this object created (nothing else), and release the destination."""
        if self._owned:
            shutil.rmtree(self.stage, ignore_errors=True)
            self._owned = False
        self._lock.release()
