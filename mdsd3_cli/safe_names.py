"""Names read from a dataset (run.json, manifest records) that become part of a path: one safe component each."""

from __future__ import annotations

_FORBIDDEN = ("/", "\\", "\0")


def safe_component(name: str, what: str) -> str:
    """`name` when it is a single safe path component, else ValueError naming `what` and `name`.

    Refused: a non-string, the empty name, `.` and `..`, and any name holding `/`, `\\` or NUL (so joining it
    to a folder can never leave that folder). A leading `-` is allowed (export passes paths, never arguments).
    """
    if not isinstance(name, str) or name in ("", ".", "..") or any(char in name for char in _FORBIDDEN):
        raise ValueError(f"{what} {name!r} is not a safe file name (one path component: no '/', '\\', NUL, "
                         "'.' or '..', not empty)")
    return name
