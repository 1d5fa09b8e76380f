"""The training log: OUT/log.jsonl (one JSON line per logged step) and, when installed, TensorBoard scalars."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mdsd3_cli.util.atomic import atomic_write, open_append

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

LOG_NAME = "log.jsonl"


def truncate_log(out: Path, step: int) -> None:
    """Drop log lines past the resumed step (written by the interrupted run after its last checkpoint)."""
    path = out / LOG_NAME
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    atomic_write(path, "".join(f"{line}\n" for line in kept).encode(), root=out)


def open_tensorboard(out: Path, start_step: int) -> SummaryWriter | None:
    """A TensorBoard writer under OUT/tensorboard (steps past `start_step` overwritten), None without tensorboard."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)


def append_log(out: Path, record: dict[str, Any], tensorboard: SummaryWriter | None) -> None:
    """One line of OUT/log.jsonl; its loss, lr and grad_norm also as TensorBoard scalars."""
    with open_append(out / LOG_NAME, out) as handle:
        handle.write((json.dumps(record) + "\n").encode())
    if tensorboard is not None:
        for key in ("loss", "lr", "grad_norm"):
            if record.get(key) is not None:
                tensorboard.add_scalar(f"train/{key}", record[key], record["step"])
