"""One writer per output: a kernel lock (`flock`, taken without waiting) on a file beside the output,
`.<name>.mdsd3-<kind>.lock` (`export` for `mdsd3 export`'s destinations, `output` for the reports of evaluate,
calibrate and preview), removed by its holder when done. A kill -9 leaves the file unlocked; the next writer takes
it over."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

_LOCK_ATTEMPTS = 5


class OutputBusyError(OSError):
    """Another process holds the output's lock."""


def lock_path(output: Path, kind: str = "export") -> Path:
    """The lock file of `output` (a sibling)."""
    output = Path(output)
    return output.with_name(f".{output.name}.mdsd3-{kind}.lock")


class OutputLock:
    """An exclusive, non-blocking `flock` on `lock_path(output, kind)`, removed by its holder on `release()`.

    A holder unlinks the file while still holding it, and a taker checks after locking that the file it locked is
    still the one at that name, so two processes can never both hold the lock of one output. A file at the
    lock's name that mdsd3 did not write (a link, a non-regular or non-empty foreign file) is refused, never
    removed. Usable as a context manager.
    """

    def __init__(self, output: Path, kind: str) -> None:
        self.output = Path(output)
        self.kind = kind
        self.path = lock_path(self.output, kind)
        self._content = f"mdsd3 {kind} lock\n".encode("ascii")
        self._descriptor: int | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_LOCK_ATTEMPTS):
            descriptor = self._open()
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = os.pread(descriptor, 64, 0).decode("ascii", "replace").split("\n")[1:2]
                os.close(descriptor)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    pid = f" (PID {holder[0]})" if holder and holder[0] else ""
                    what = "export" if kind == "export" else "mdsd3 process"
                    raise OutputBusyError(
                        f"another {what} is writing {self.output}{pid}; wait for it to "
                        "finish or choose another destination"
                    ) from None
                raise
            if self._still_at_path(descriptor):
                os.ftruncate(descriptor, 0)
                os.pwrite(descriptor, self._content + f"{os.getpid()}\n".encode("ascii"), 0)
                self._descriptor = descriptor
                return
            os.close(descriptor)  # its holder removed it between our open and lock: take the new one
        raise OutputBusyError(f"{self.path} keeps changing; another process is writing {self.output}")

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            descriptor = os.open(self.path, flags, 0o644)
        except OSError:
            if os.path.islink(self.path):
                raise OutputBusyError(
                    f"{self.path} (the lock of {self.output}) is a symbolic link that mdsd3 did not make; remove it"
                ) from None
            raise
        status = os.fstat(descriptor)  # st_nlink 0: its holder just removed it (the lock then fails or is retried)
        foreign = (
            not stat.S_ISREG(status.st_mode)
            or status.st_nlink > 1
            or (status.st_size and not os.pread(descriptor, len(self._content), 0) == self._content)
        )
        if foreign:
            os.close(descriptor)
            raise OutputBusyError(
                f"{self.path} (the lock of {self.output}) is a file mdsd3 did not write; "
                "remove it or choose another destination"
            )
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
