"""Which folders mdsd3 may write and delete in: it claims only an empty folder or one it made (its run.json),
lets one process at a time write a shard (a kernel lock), and `--overwrite` removes only what its manifests list."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from mdsd3_cli.util.atomic import open_append
from mdsd3_cli.dataset.writer import RUN_JSON, OutputConflictError, manifest_listed_files

LOCKS = ".locks"
_OWN_TRANSIENT_PREFIXES = (f".{RUN_JSON}.", ".mdsd3-write-test-")
"""Names mdsd3 itself creates for a moment in OUT before run.json exists (ignored when deciding "empty")."""


def foreign_output_reason(out: Path) -> str | None:
    """Why mdsd3 must not write into `out` (an existing folder with other content and no run.json), or None."""
    out = Path(out)
    if not os.path.lexists(out):
        return None
    if not out.is_dir():
        return f"output folder {out} exists and is not a folder"
    if (out / RUN_JSON).is_file():
        return None
    others = sorted(entry.name for entry in out.iterdir()
                    if entry.name != LOCKS and not entry.name.startswith(_OWN_TRANSIENT_PREFIXES))
    if not others:
        return None
    shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
    return (f"output folder {out} is not empty ({shown}) and has no {RUN_JSON}, so mdsd3 did not make it; "
            "mdsd3 writes only into an empty folder or its own output: choose another output.dir")


def claim_output(out: Path) -> None:
    """Raise OutputConflictError unless mdsd3 may write into `out`."""
    reason = foreign_output_reason(out)
    if reason is not None:
        raise OutputConflictError(reason)


class ShardBusyError(OutputConflictError):
    """Another live process holds the lock of this (output, shard)."""


class OutputLock:
    """An exclusive, non-blocking `flock` on OUT/.locks/<name>.lock holding the owner's PID.

    The kernel releases it when the process ends, however it ends (kill -9 included): no stale locks.
    """

    def __init__(self, out: Path, name: str, what: str) -> None:
        self.path = Path(out) / LOCKS / f"{name}.lock"
        self.root = Path(out)
        self.what = what
        self._file = None

    def __enter__(self) -> OutputLock:
        file = open_append(self.path, self.root)
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            file.seek(0)
            holder = file.read(32).decode("ascii", "replace").strip() or "unknown"
            file.close()
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ShardBusyError(f"{self.what} of {self.root} is being written by another process (PID {holder}); "
                                     "wait for it to finish or stop it") from None
            raise
        file.truncate(0)
        file.write(f"{os.getpid()}\n".encode("ascii"))
        file.flush()
        self._file = file
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._file is not None:
            self._file.close()  # closing the last descriptor releases the flock
            self._file = None


def shard_lock(out: Path, shard: str) -> OutputLock:
    """The lock of one generate shard in `out`."""
    return OutputLock(out, shard, f"shard {shard}")


def clear_outputs(out: Path) -> int:
    """`--overwrite`: remove the files the manifests list, the manifests, error logs and run.json; returns how
    many files went. Anything else (files mdsd3 did not record, other folders) stays; emptied folders go."""
    root = Path(out)
    removed = 0
    listed = manifest_listed_files(root)
    logs = [path for area in ("manifest", "errors") for path in sorted((root / area).glob("*.json*"))]
    for path in [*listed, *(file.with_name(f".{file.name}.tmp") for file in listed), *logs, root / RUN_JSON]:
        if os.path.lexists(path) and not path.is_dir():
            path.unlink()  # a link is removed, never followed
            removed += 1
    for folder in sorted({parent for path in [*listed, *logs] for parent in path.parents if parent != root
                          and parent.is_relative_to(root)}, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass
    return removed
