"""Suggestions for mistyped names (recipe fields, degradation classes): one rule, so every message agrees."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest_name(name: str, known: Iterable[str]) -> str | None:
    """The known name most like `name` (difflib ratio at least 0.6), or None when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_class_message(name: str, known: Iterable[str]) -> str:
    """`unknown degradation class 'rian'; did you mean 'rain'? known classes: [...]`."""
    known = list(known)
    close = closest_name(name, known)
    hint = f"; did you mean {close!r}?" if close else ";"
    return f"unknown degradation class {name!r}{hint} known classes: {known}"
