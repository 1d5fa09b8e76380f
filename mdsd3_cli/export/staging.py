"""A whole output folder built under a temporary name and renamed onto its final name only when complete,
so a killed export never leaves something that looks finished (single files: `atomic.AtomicFile`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mdsd3_cli.util.atomic import fresh_folder


class DestinationExistsError(FileExistsError):
    """The final name is taken; a finished output is never replaced."""


class StagedFolder:
    """A folder built as `.<name>.partial` beside `path` and renamed onto `path` by `commit()`.

    `path` must not exist (a finished folder is never replaced); a partial folder a killed run left is removed.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser().absolute()
        if os.path.lexists(self.path):
            raise DestinationExistsError(f"{self.path} exists; remove it or choose another destination")
        self.stage = self.path.with_name(f".{self.path.name}.partial")
        self.stage.parent.mkdir(parents=True, exist_ok=True)
        fresh_folder(self.stage)

    def commit(self) -> None:
        if os.path.lexists(self.path):
            raise DestinationExistsError(f"{self.path} appeared while it was being written; "
                                         f"the finished result is left in {self.stage}")
        os.rename(self.stage, self.path)

    def discard(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)
