"""Atomic output for writers that write over time: a file or a whole folder under a temporary name, renamed
onto its final name only when complete (so a killed run never leaves something that looks finished)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO


class DestinationExistsError(FileExistsError):
    """The final name is taken; a finished output is never replaced."""


class AtomicFile:
    """`.<name>.tmp` beside `path`, opened for writing; `commit()` fsyncs and renames it onto `path`.

    A temp file a killed run left is unlinked (never followed) and recreated exclusively.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.temp = self.path.with_name(f".{self.path.name}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(self.temp):
            os.unlink(self.temp)
        descriptor = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        self.file: BinaryIO = os.fdopen(descriptor, "wb")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temp, self.path)

    def discard(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


class StagedFolder:
    """A folder built as `.<name>.partial` beside `path` and renamed onto `path` by `commit()`.

    `path` must not exist (a finished folder is never replaced); a partial folder a killed run left is removed.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser().absolute()
        if os.path.lexists(self.path):
            raise DestinationExistsError(f"{self.path} exists; remove it or choose another destination")
        self.stage = self.path.with_name(f".{self.path.name}.partial")
        if self.stage.is_symlink() or self.stage.is_file():
            self.stage.unlink()
        elif self.stage.exists():
            shutil.rmtree(self.stage)
        self.stage.mkdir(parents=True)

    def commit(self) -> None:
        if os.path.lexists(self.path):
            raise DestinationExistsError(f"{self.path} appeared while it was being written; "
                                         f"the finished result is left in {self.stage}")
        os.rename(self.stage, self.path)

    def discard(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)
