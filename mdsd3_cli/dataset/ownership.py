"""Which folders mdsd3 may write and delete in: it claims only an empty folder or one it made (a run.json that
mdsd3 wrote), lets one process at a time write a shard and one sharding at a time write an output (kernel locks),
and `--overwrite` removes only what its manifests list and the log files it names itself."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
from pathlib import Path
from types import TracebackType
from typing import Any

from mdsd3_cli.dataset.encoding import FORMAT_EXTENSIONS
from mdsd3_cli.dataset.manifest import FILE_FIELDS, TAR_FIELD
from mdsd3_cli.dataset.names import (
    CLEAN_FOLDER,
    DEGRADED_FOLDER,
    ERRORS_FOLDER,
    ERRORS_SUFFIX,
    LOCK_SUFFIX,
    LOCKS_FOLDER,
    MANIFEST_FOLDER,
    MANIFEST_SUFFIX,
    RUN_JSON,
    SHARD_LOG_SUFFIXES,
    TARS_FOLDER,
    TARS_PLAN_SUFFIX,
    own_logs,
    parse_tar_name,
)
from mdsd3_cli.dataset.reader import manifest_entries
from mdsd3_cli.dataset.run_record import RUN_SCHEMA, RUN_TOOL, OutputConflictError
from mdsd3_cli.util.atomic import leftover_temps, open_append
from mdsd3_cli.util.images import unsafe_key_reason
from mdsd3_cli.util.safe_names import safe_component

_OWN_TRANSIENT_PREFIXES = (f".{RUN_JSON}.", ".mdsd3-write-test-")
"""Names mdsd3 itself creates for a moment in OUT before run.json exists (ignored when deciding "empty")."""


_MAX_RUN_JSON_BYTES = 64 << 20
_LEGACY_RECIPE_FIELDS = {"model", "input", "output", "variants"}


def run_json_problem(path: Path) -> str | None:
    """Why the run.json at `path` is not one mdsd3 wrote, or None when it is: a regular file (not a link) holding
    a JSON object with `"tool": "mdsd3"` and a known schema, or (written before that marker existed) an
    `identity` object and the resolved `recipe` with its model, input, output and variants."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return "it is a link or not a regular file"
        with open(path, "rb") as file:
            payload = json.loads(file.read(_MAX_RUN_JSON_BYTES + 1)[:_MAX_RUN_JSON_BYTES])
    except (OSError, ValueError) as error:
        return f"unreadable: {error}"
    if not isinstance(payload, dict):
        return "not a JSON object"
    if "tool" in payload or "schema" in payload:
        if payload.get("tool") != RUN_TOOL or payload.get("schema") != RUN_SCHEMA:
            return f"tool {payload.get('tool')!r}, schema {payload.get('schema')!r}"
        return None
    recipe = payload.get("recipe")
    legacy = isinstance(payload.get("identity"), dict) and isinstance(recipe, dict)
    if legacy and _LEGACY_RECIPE_FIELDS <= recipe.keys():
        return None
    return "no mdsd3 marker"


def foreign_output_reason(out: Path) -> str | None:
    """Why mdsd3 must not write into `out` (an existing folder with other content and no run.json mdsd3 wrote),
    or None."""
    out = Path(out)
    if not os.path.lexists(out):
        return None
    if not out.is_dir():
        return f"output folder {out} exists and is not a folder"
    if os.path.lexists(out / RUN_JSON):
        problem = run_json_problem(out / RUN_JSON)
        if problem is None:
            return None
        return (
            f"output folder {out} holds a {RUN_JSON} that mdsd3 did not write ({problem}), so mdsd3 did not "
            "make it; mdsd3 writes only into an empty folder or its own output: choose another output.dir"
        )
    others = sorted(
        entry.name
        for entry in out.iterdir()
        if entry.name != LOCKS_FOLDER and not entry.name.startswith(_OWN_TRANSIENT_PREFIXES)
    )
    if not others:
        return None
    shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
    return (
        f"output folder {out} is not empty ({shown}) and has no {RUN_JSON}, so mdsd3 did not make it; "
        "mdsd3 writes only into an empty folder or its own output: choose another output.dir"
    )


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
        self.path = Path(out) / LOCKS_FOLDER / f"{name}{LOCK_SUFFIX}"
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
                raise ShardBusyError(
                    f"{self.what} of {self.root} is being written by another process (PID {holder}); "
                    "wait for it to finish or stop it"
                ) from None
            raise
        file.truncate(0)
        file.write(f"{os.getpid()}\n".encode("ascii"))
        file.flush()
        self._file = file
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._file is not None:
            self._file.close()  # closing the last descriptor releases the flock
            self._file = None


def shard_lock(out: Path, shard: str) -> OutputLock:
    """The lock of one generate shard in `out`."""
    return OutputLock(out, shard, f"shard {shard}")


_SHARDING_LOCK = "sharding-of-{count:05d}.lock"
_SHARDING_LOCK_NAME = re.compile(r"sharding-of-(\d{5})\.lock")


class ShardingLock:
    """Which sharding (shard count) writes `out`: a shared `flock` on OUT/.locks/sharding-of-<count>.lock, held
    by every shard of that count, so shards of one sharding run side by side; taken, it is refused (and given
    back) while any other count's file is locked by a live process. Two different counts starting at the same
    moment may both be refused, never both admitted. Released by the kernel however the process ends."""

    def __init__(self, out: Path, count: int) -> None:
        self.root, self.count = Path(out), count
        self.path = self.root / LOCKS_FOLDER / _SHARDING_LOCK.format(count=count)
        self._file = None

    def __enter__(self) -> ShardingLock:
        file = open_append(self.path, self.root)
        fcntl.flock(file.fileno(), fcntl.LOCK_SH)  # waits only while another run probes this file (a moment)
        for other in sorted(self.path.parent.iterdir()):
            match = _SHARDING_LOCK_NAME.fullmatch(other.name)
            other_count = int(match.group(1)) if match else self.count
            if other_count != self.count and locked_by_another(other):
                file.close()
                raise ShardBusyError(
                    f"{self.root} is being written by another process with {other_count} shards "
                    f"(this run has {self.count}); one output takes one shard count at a time: "
                    "wait for it to finish or use its --num-shards"
                )
        self._file = file
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def sharding_lock(out: Path, count: int) -> ShardingLock:
    """The lock every shard of a `count`-shard generate holds on `out`."""
    return ShardingLock(out, count)


def locked_by_another(path: Path) -> bool:
    """Whether a live process holds a `flock` on `path` (probed with a non-blocking exclusive lock)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False  # gone meanwhile, or not a lock file mdsd3 made
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(descriptor)  # also gives back the probe's lock
    return False


def clear_outputs(out: Path) -> int:
    """`--overwrite` (in a folder `claim_output` accepted): remove the files the manifests list, the shards'
    manifests, plans and error logs, and run.json; returns how many files went. Anything else (files mdsd3 did not
    record, other names in manifest/ and errors/, other folders) stays; emptied folders go."""
    root = Path(out)
    removed = 0
    listed = manifest_listed_files(root)
    logs = [
        *(path for suffix in SHARD_LOG_SUFFIXES for path in own_logs(root, MANIFEST_FOLDER, suffix)),
        *own_logs(root, ERRORS_FOLDER, ERRORS_SUFFIX),
    ]
    for path in [*listed, *leftover_temps(listed), *logs, root / RUN_JSON]:
        if os.path.lexists(path) and not path.is_dir():
            path.unlink()  # a link is removed, never followed
            removed += 1
    for folder in sorted(
        {
            parent
            for path in [*listed, *logs]
            for parent in path.parents
            if parent != root and parent.is_relative_to(root)
        },
        key=lambda p: len(p.parts),
        reverse=True,
    ):
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass
    return removed


LISTED_FILE_FIELDS = (*FILE_FIELDS, TAR_FIELD)
"""Manifest fields naming files in OUT (images of the folders layout, the tar of the webdataset layout)."""


def _recorded_shape(relative: str) -> bool:
    """Whether `relative` has the shape of a file mdsd3 writes: clean/<key>.<ext>, degraded/<folder>/<key>.<ext>
    or tars/<shard>-<n>.tar."""
    parts = relative.split("/")
    if parts[0] == TARS_FOLDER:
        return len(parts) == 2 and parse_tar_name(parts[1]) is not None
    if parts[-1].rpartition(".")[2] not in FORMAT_EXTENSIONS.values():
        return False
    if parts[0] == DEGRADED_FOLDER and len(parts) >= 3:
        try:
            safe_component(parts[1], "variant folder")
        except ValueError:
            return False
        return True
    return parts[0] == CLEAN_FOLDER and len(parts) >= 2


def manifest_listed_files(out_dir: str | Path) -> list[Path]:
    """The files the manifest lines name (what mdsd3 recorded writing), and those a shard's plan file
    (`manifest/<shard>.tars.json`) lists under "files" (its planned tars), each checked to be a safe relative path
    of a shape mdsd3 writes whose folder lies inside the output folder; sorted, without duplicates."""
    root = Path(out_dir).resolve()
    listed: set[Path] = set()

    def add(names: list[Any]) -> None:
        for relative in (name for name in names if isinstance(name, str)):
            path = root / relative
            if (
                unsafe_key_reason(relative) is None
                and _recorded_shape(relative)
                and path.parent.resolve().is_relative_to(root)
            ):
                listed.add(path)

    # a line mdsd3 cannot read as its own record names nothing to delete
    for entry in manifest_entries(root, own_logs(root, MANIFEST_FOLDER, MANIFEST_SUFFIX)):
        add([entry.record.get(name) for name in LISTED_FILE_FIELDS])
    for listing in own_logs(root, MANIFEST_FOLDER, TARS_PLAN_SUFFIX):
        try:
            files = json.loads(listing.read_text(encoding="utf-8")).get("files")
        except (OSError, ValueError, AttributeError):
            continue
        add(files if isinstance(files, list) else [])
    return sorted(listed)
