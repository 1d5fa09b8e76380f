"""A shard's two logs: its manifest (`manifest/<shard>.jsonl`, one record line per finished sample, appended and
fsynced) and its error log (`errors/<shard>.jsonl`, one line per skipped input, the latest run's only). Both
layout writers append through `ShardLog`."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from mdsd3_cli.dataset.output_paths import OutputPaths
from mdsd3_cli.util.atomic import open_append

_TAIL_CHUNK = 1 << 16


class ErrorLine(NamedTuple):
    """One line of an error log: a skipped input's key (None when it has none), path and reason."""

    key: str | None
    path: str
    reason: str


def json_line(record: Mapping[str, Any]) -> bytes:
    """One manifest/errors line: sorted keys, ASCII-only (any file name encodes), newline-terminated."""
    return (json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode("ascii")


def _truncate_partial_line(file: BinaryIO) -> None:
    """Cut a line left unfinished by a killed append (everything after the last newline)."""
    end = file.seek(0, os.SEEK_END)
    keep, position = 0, end
    while position > 0:
        start = max(0, position - _TAIL_CHUNK)
        file.seek(start)
        newline = file.read(position - start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        position = start
    if keep != end:
        file.truncate(keep)
        file.flush()
        os.fsync(file.fileno())


class ShardLog:
    """A shard's manifest (kept, a killed append's unfinished line cut) and error log (emptied: the latest run's
    errors), open until `close`; safe to call from several threads."""

    def __init__(self, layout: OutputPaths, shard: str) -> None:
        self._lock = threading.Lock()
        self._manifest = open_append(layout.manifest_path(shard), layout.root)
        _truncate_partial_line(self._manifest)
        self._errors = open_append(layout.errors_path(shard), layout.root, truncate=True)

    def append_records(self, lines: Sequence[bytes]) -> None:
        """Append whole manifest lines, fsynced."""
        with self._lock:
            self._manifest.writelines(lines)
            self._manifest.flush()
            os.fsync(self._manifest.fileno())

    def record_error(self, key: str | None, path: str | Path, reason: str) -> None:
        """Append one line for a skipped input."""
        line = json_line(ErrorLine(key, str(path), reason)._asdict())
        with self._lock:
            self._errors.write(line)
            self._errors.flush()

    def close(self) -> None:
        self._manifest.close()
        self._errors.close()


def recorded_failures(layout: OutputPaths, shard: str) -> dict[str, ErrorLine]:
    """The inputs a shard's error log lists as failed, by key (unreadable lines and lines without a key are
    ignored)."""
    failures: dict[str, ErrorLine] = {}
    for line in regular_file_lines(layout.errors_path(shard)):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and all(isinstance(entry.get(name), str) for name in ErrorLine._fields):
            failures[entry["key"]] = ErrorLine(entry["key"], entry["path"], entry["reason"])
    return failures


def regular_file_lines(path: Path) -> Iterator[bytes]:
    """The lines of the log at `path`; none when it is missing or not a regular file (the writer refuses such a
    file with a clear message)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return
        with open(path, "rb") as handle:
            yield from handle
    except FileNotFoundError:
        return
