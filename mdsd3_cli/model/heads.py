"""Degradation classes, the class-to-head partition, per-sample head masks and the prompt rule (docs/METHOD.md §1)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mdsd3_cli.util.names import unknown_class_message

CLEAN_PROMPT = "clean"
UNCONDITIONAL_PROMPT = ""

if TYPE_CHECKING:
    import torch


class UnknownClassError(ValueError):
    """A ratio names a class the adapter was not trained for."""


def partition_heads(num_heads: int, num_classes: int) -> list[list[int]]:
    """Split heads 0..H-1 into K contiguous groups of floor/ceil(H/K) heads, larger groups first."""
    if num_classes < 1:
        raise ValueError("an adapter needs at least one degradation class")
    if num_classes > num_heads:
        raise ValueError(
            f"{num_classes} classes cannot share {num_heads} attention heads (one head per class at least)"
        )
    base, extra = divmod(num_heads, num_classes)
    groups, start = [], 0
    for index in range(num_classes):
        size = base + (1 if index < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def head_class_index(partition: Sequence[Sequence[int]]) -> list[int]:
    """For each head, the index of the class that owns it."""
    owner = {head: cls for cls, heads in enumerate(partition) for head in heads}
    return [owner[h] for h in range(len(owner))]


def is_ratio(value: Any) -> bool:
    """A real number (Python or numpy, not a bool) in [0, 1]; NaN is not."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def check_ratios(ratios: Mapping[str, float], classes: Sequence[str]) -> None:
    """Raise a clear error for unknown class names or ratios outside [0, 1]."""
    for name, value in ratios.items():
        if name not in classes:
            raise UnknownClassError(unknown_class_message(name, classes))
        if not is_ratio(float(value)):
            raise ValueError(f"ratio for {name!r} is {value}; ratios must lie in [0, 1]")


def ratio_vector(ratios: Mapping[str, float], classes: Sequence[str]) -> list[float]:
    """Ratios in the adapter's class order (absent class: 0)."""
    check_ratios(ratios, classes)
    return [float(ratios.get(name, 0.0)) for name in classes]


def head_mask(
    ratio_rows: Sequence[Sequence[float]], partition: Sequence[Sequence[int]], device=None, dtype=None
) -> torch.Tensor:
    """A [batch, heads] float32 (or `dtype`) mask with m[b, h] = ratio of the class owning head h."""
    import torch  # the rest of this module is torch-free: recipes import it

    owners = torch.tensor(head_class_index(partition), dtype=torch.long)
    table = torch.tensor([list(row) for row in ratio_rows], dtype=torch.float32).reshape(
        len(ratio_rows), len(partition)
    )
    return table[:, owners].to(device=device, dtype=dtype)


def prompt_for(ratios: Mapping[str, float], classes: Sequence[str]) -> str:
    """The text prompt of a sample: active class names in adapter order, or "clean" when none is active."""
    check_ratios(ratios, classes)
    active = [name for name in classes if float(ratios.get(name, 0.0)) > 0.0]
    return " ".join(active) if active else CLEAN_PROMPT


def all_prompts(classes: Sequence[str]) -> list[str]:
    """Every prompt an adapter can ask for (2^K subsets) plus the unconditional one."""
    prompts = {UNCONDITIONAL_PROMPT}
    for bits in range(1 << len(classes)):
        prompts.add(prompt_for({c: 1.0 for i, c in enumerate(classes) if bits >> i & 1}, classes))
    return sorted(prompts)
