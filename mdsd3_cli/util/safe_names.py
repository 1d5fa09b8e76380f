"""Names read from a dataset (run.json, manifest records) that become one file or folder name."""

from __future__ import annotations


def safe_component(name: str, what: str) -> str:
    """`name` when it is one safe path component; ValueError naming `what` and the name otherwise (empty, '.',
    '..', or holding '/', '\\' or NUL)."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(char in name for char in "/\\\0"):
        raise ValueError(
            f"{what} {name!r} is not a single safe file name (empty, '.', '..', or holding '/', '\\' or NUL)"
        )
    return name
