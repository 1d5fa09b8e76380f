"""A whole output folder built in a private staging folder beside its final name and renamed onto that name only
when complete, so a killed export never leaves something that looks finished (single files: `atomic.AtomicFile`).

Guarantees: one writer per destination (`util.output_lock`: a kernel lock on `.<name>.mdsd3-export.lock` beside
it, taken without waiting); the staging folder is created exclusively under a unique name
(`.<name>.<random>.partial`, with the umask's folder mode, not mkdtemp's 0700) and holds an owner marker while it
is built; only the staging folder this process created is ever deleted; the final rename never replaces anything
that appeared at the destination meanwhile.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mdsd3_cli.util.atomic import atomic_write, folder_mode
from mdsd3_cli.util.output_lock import OutputBusyError as DestinationBusyError
from mdsd3_cli.util.output_lock import OutputLock, lock_path

__all__ = ["DestinationBusyError", "DestinationExistsError", "StagedFolder", "lock_path", "rename_no_replace"]
"""`DestinationBusyError` and `lock_path` are `util.output_lock`'s, under the names export's callers use."""

STAGE_SUFFIX = ".partial"
OWNER_MARKER = ".mdsd3-export-staging"
"""A file inside a staging folder while it is built: its writer's PID (a killed export's leftover is recognisable
and safe to delete by hand; mdsd3 never deletes a staging folder it did not create in this process)."""
PARTIAL_FILE = "PARTIAL_EXPORT.json"
"""In a folder export made with --partial: why it is partial and what was left out."""
_RENAME_NOREPLACE = 1


class DestinationExistsError(FileExistsError):
    """The final name is taken; a finished output is never replaced."""


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
        self._lock = OutputLock(self.path, "export")
        try:
            if os.path.lexists(self.path):
                raise DestinationExistsError(f"{self.path} exists; remove it or choose another destination")
            self.stage = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=STAGE_SUFFIX, dir=self.path.parent))
        except BaseException:
            self._lock.release()
            raise
        self._owned = True
        try:
            os.chmod(self.stage, folder_mode())  # mkdtemp's 0700 would become DEST's mode
            atomic_write(self.stage / OWNER_MARKER, f"{os.getpid()}\n{self.path}\n".encode())
        except BaseException:
            self.discard()
            raise

    def record_partial(self, partial: Mapping[str, Any]) -> None:
        """Write PARTIAL_FILE (what `partial` says) into the folder."""
        atomic_write(
            self.stage / PARTIAL_FILE,
            json.dumps(dict(partial), indent=2, sort_keys=True).encode("utf-8"),
            root=self.stage,
        )

    def commit(self) -> None:
        (self.stage / OWNER_MARKER).unlink()
        try:
            rename_no_replace(self.stage, self.path)
        except FileExistsError:
            self._owned = False  # keep the finished result
            self._lock.release()
            raise DestinationExistsError(
                f"{self.path} appeared while it was being written (not by mdsd3 export); "
                f"the finished result is left in {self.stage}"
            ) from None
        self._owned = False
        self._lock.release()

    def discard(self) -> None:
        """Remove the staging folder this object created (nothing else), and release the destination."""
        if self._owned:
            shutil.rmtree(self.stage, ignore_errors=True)
            self._owned = False
        self._lock.release()
