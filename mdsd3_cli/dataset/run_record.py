"""OUT/run.json: a run's record of itself (resolved recipe, identity, versions) and the check that a rerun is the
same run."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mdsd3_cli.dataset.names import RUN_JSON
from mdsd3_cli.util.atomic import atomic_write

RUN_TOOL, RUN_SCHEMA = "mdsd3", 1
"""run.json's `tool` and `schema` fields: the marker saying mdsd3 wrote it (see ownership.run_json_problem)."""


class OutputConflictError(RuntimeError):
    """The output folder holds a different run."""


def write_run_json(out_dir: str | Path, payload: Mapping[str, Any]) -> Path:
    """Atomically write OUT/run.json; `payload["identity"]` is what `check_run_compatible` compares.

    Every shard of an array job may write run.json at the same time: each uses its own temp file.
    """
    if "identity" not in payload:
        raise ValueError("run.json payload needs an 'identity' entry")
    path = Path(out_dir) / RUN_JSON
    marked = {**payload, "tool": RUN_TOOL, "schema": RUN_SCHEMA}
    atomic_write(
        path, (json.dumps(marked, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"), shared=True
    )
    return path


def check_run_compatible(out_dir: str | Path, identity: Mapping[str, Any], overwrite: bool) -> None:
    """Raise OutputConflictError when OUT/run.json holds another identity (unless `overwrite`)."""
    path = Path(out_dir) / RUN_JSON
    if overwrite or not path.exists():
        return
    advice = "pass --overwrite to replace it, or choose another output folder"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))["identity"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputConflictError(
            f"output folder {Path(out_dir)} has an unreadable run.json ({exc}); {advice}"
        ) from None
    expected = json.loads(json.dumps(identity))  # tuples → lists, as stored
    if stored == expected:
        return
    shown = identity_differences(stored, expected)
    more = f" and {len(shown) - MAX_SHOWN_DIFFERENCES} more" if len(shown) > MAX_SHOWN_DIFFERENCES else ""
    raise OutputConflictError(
        f"output folder {Path(out_dir)} already holds a different run ({'; '.join(shown[:MAX_SHOWN_DIFFERENCES])}"
        f"{more}; its run.json → this recipe); use the recipe it was made with to resume, {advice}"
    )


MAX_SHOWN_DIFFERENCES = 5


def identity_differences(stored: Any, expected: Any, path: str = "") -> list[str]:
    """`path: stored → expected` for each leaf where two run identities differ, down to the field that differs
    (`variants[1].name`); a list of another length also gets `path: N items → M items`."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        found = []
        for name in sorted(stored.keys() | expected.keys()):
            found += identity_differences(stored.get(name), expected.get(name), f"{path}.{name}" if path else name)
        return found
    if isinstance(stored, list) and isinstance(expected, list):
        found = (
            []
            if len(stored) == len(expected)
            else [f"{path or 'identity'}: {_items(len(stored))} → {_items(len(expected))}"]
        )
        for index, (old, new) in enumerate(zip(stored, expected)):
            found += identity_differences(old, new, f"{path}[{index}]")
        return found
    if stored == expected:
        return []
    return [f"{path or 'identity'}: {_shown_pair(stored, expected)}"]


def _items(count: int) -> str:
    return f"{count} item" if count == 1 else f"{count} items"


def _shown_pair(stored: Any, expected: Any, limit: int = 60) -> str:
    """`stored → expected` as JSON; texts longer than `limit` are cut to a window around their first difference,
    the same on both sides, so the difference shows."""
    texts = ["(none)" if value is None else json.dumps(value, sort_keys=True) for value in (stored, expected)]
    if max(len(text) for text in texts) <= limit:
        return " → ".join(texts)
    first = next((i for i, (a, b) in enumerate(zip(*texts)) if a != b), min(len(text) for text in texts))
    start = max(0, first - limit // 3)
    return " → ".join(
        ("…" if start else "") + text[start : start + limit] + ("…" if start + limit < len(text) else "")
        for text in texts
    )
