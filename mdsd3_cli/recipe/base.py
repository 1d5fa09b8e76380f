"""What generate and train recipes share: the strict section base, the model section, the built-in base's name,
the ratio of a class, the error every recipe problem raises and how a recipe's paths resolve."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from mdsd3_cli.model.heads import CLEAN_PROMPT
from mdsd3_cli.recipe.file import Problem

TINY_BASE = "tiny"
"""The built-in random test base (no files)."""

UnitRatio = Annotated[float, Field(ge=0.0, le=1.0)]
"""A class ratio that is one number in [0, 1] (a training pair's; a generate variant's may be drawn: `RatioDraw`)."""


class RecipeError(ValueError):
    """A recipe that cannot be used: one `FILE: dotted.field: problem` line per problem (a problem without a
    field: `FILE: problem`, one line per line of it)."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = []
        for field, message in self.problems:
            if field:
                lines.append(f"{source}: {field}: {message}")
            else:
                lines.extend(f"{source}: {line}" for line in message.splitlines())
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[type[RecipeError], tuple[str, list[Problem]]]:
        return type(self), (self.source, self.problems)


class Section(BaseModel):
    """Strict base of every recipe section: unknown keys, wrong types (no silent coercion: `"5"` is not 5) and
    NaN or infinite numbers are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelSection(Section):
    """Which base model and adapter to run, and how."""

    base: str = Field(min_length=1)
    adapter: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    prompt_cache: str | None = None


def check_class_names(names: list[str]) -> list[str]:
    """`names` when they are distinct and each one word other than the empty class set's prompt; else ValueError."""
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate class names in {names}")
    for name in names:
        if name.split() != [name] or name == CLEAN_PROMPT:
            raise ValueError(f"class name {name!r} must be one word and not {CLEAN_PROMPT!r}")
    return names


def resolve_path(raw: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """A path as a recipe means it: `~` expanded, a relative one taken against `folder` (the recipe file's),
    absolute and normalised without following links."""
    return Path(os.path.abspath(Path(folder) / Path(raw).expanduser()))
