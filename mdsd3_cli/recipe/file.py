"""Reading a recipe file, generate and train recipes alike: a bounded read, safe YAML that refuses duplicate
keys and runaway nesting or alias expansion, `--set` overrides that remember where a value came from, and
validation problems worded the same way for both kinds of recipe."""

from __future__ import annotations

import inspect
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from mdsd3_cli.recipe.overrides import apply_override
from mdsd3_cli.recipe.safe_yaml import YamlError, load_yaml
from mdsd3_cli.util.names import closest_name

MAX_REPEATS = 1000
"""Most draws per photo one variant may ask for (`repeats`)."""
MAX_SAMPLES_PER_INPUT = 10_000
"""Most samples one input image may give, all variants and repeats together (bounds every per-input plan)."""


def variant_folder(name: str, repeat: int, repeats: int) -> str:
    """The output folder of a variant's repeat (1-based): the name itself with one repeat, else `<name>_r<repeat>`
    (the one rule: generate names folders with it, readers of run.json rebuild them with it)."""
    return name if repeats == 1 else f"{name}_r{repeat}"


MAX_RECIPE_BYTES = 1 << 20
"""A recipe is a small text file; anything larger is refused before it is parsed."""

RecipeKind = Literal["generate", "train"]
Problem = tuple[str, str]
"""A (dotted field path, message) pair."""

_MESSAGES = {"extra_forbidden": "unknown field", "missing": "required field is missing"}
_SHOWS_NO_INPUT = ("value_error", "missing", "extra_forbidden", "assertion_error")


class RecipeFileError(ValueError):
    """A recipe file that cannot be read as a recipe at all; `where` is a field, a line, or empty."""

    def __init__(self, source: str, where: str, message: str) -> None:
        self.source, self.where, self.message = source, where, message
        super().__init__(f"{source}: {where}: {message}" if where else f"{source}: {message}")

    def __reduce__(self) -> tuple[type[RecipeFileError], tuple[str, str, str]]:
        return type(self), (self.source, self.where, self.message)


def read_text(path: str | os.PathLike) -> str:
    """The recipe file's text: at most MAX_RECIPE_BYTES of UTF-8; RecipeFileError naming the file otherwise."""
    source = str(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as error:
        raise RecipeFileError(source, "", f"cannot read recipe: {error.strerror or error}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeFileError(
            source, "", f"larger than {MAX_RECIPE_BYTES // 1024} KiB; a recipe is a small YAML text file"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeFileError(
            source, "", f"not UTF-8 text (byte {error.start}); a recipe is a YAML text file"
        ) from None


@dataclass
class RecipeData:
    """A recipe's raw data (a mapping, `--set` overrides applied) and which fields the overrides set."""

    source: str
    data: dict[str, Any]
    overridden: dict[str, str] = field(default_factory=dict)
    """Resolved dotted field (`variants.0.repeats`) -> the `--set` text that set it."""

    def label(self, dotted: str) -> str:
        """A field's name in an error: `sampling.steps (from --set sampling.steps=abc)` when --set gave it."""
        for target, override in reversed(list(self.overridden.items())):
            if dotted == target or dotted.startswith(target + "."):
                return f"{dotted} (from --set {override})"
        return dotted


def read_recipe(path: str | os.PathLike, overrides: Sequence[str] = (), not_mapping: str = "") -> RecipeData:
    """Read a recipe file and apply `--set` overrides; RecipeFileError for anything that is not a mapping."""
    source = str(path)
    try:
        data = load_yaml(read_text(path), source)
    except YamlError as error:
        raise RecipeFileError(source, error.where, error.message) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeFileError(source, "", not_mapping or f"a recipe is a YAML mapping, not a {type(data).__name__}")
    recipe = RecipeData(source, data)
    for override in overrides:
        try:
            target = apply_override(data, override)
        except ValueError as error:
            raise RecipeFileError(source, "", f"--set {override!r}: {error}") from None
        recipe.overridden[target] = override
    return recipe


def recipe_kind(data: Mapping[str, Any]) -> RecipeKind:
    """`train` for a training recipe (it has `datasets`, or `classes` at the top), else `generate`."""
    if "variants" not in data and ("datasets" in data or "classes" in data):
        return "train"
    return "generate"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, list, dict, Union, Annotated)."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in typing.get_args(annotation) for model in _models_in(argument)]


def _tags(model: type[BaseModel]) -> set[Any]:
    """Values of the model's Literal fields (the discriminator of a tagged union among them)."""
    return {
        value
        for info in model.model_fields.values()
        if typing.get_origin(info.annotation) is Literal
        for value in typing.get_args(info.annotation)
    }


def known_fields(root: type[BaseModel], location: Sequence[str | int]) -> list[str]:
    """The field names valid where `location` (a pydantic error location) points."""
    models = [root]
    for part in location[:-1]:
        if isinstance(part, int):
            continue
        inner = [
            found
            for model in models
            if part in model.model_fields
            for found in _models_in(model.model_fields[part].annotation)
        ]
        models = inner or [model for model in models if part in _tags(model)] or models
    return sorted({name for model in models for name in model.model_fields})


def unknown_field_message(name: str, known: Sequence[str]) -> str:
    """'unknown field', with the closest valid name (difflib) or the list of valid ones."""
    close = closest_name(name, known)
    if close:
        return f"unknown field; did you mean {close!r}?"
    return f"unknown field; known fields here: {', '.join(known)}" if known else "unknown field"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def schema_problems(error: ValidationError, root: type[BaseModel], drop: Sequence[str] = ()) -> list[Problem]:
    """One (dotted field, message) per pydantic problem, in the project's wording; location parts in `drop`
    (tags of a discriminated union) are left out of the field name."""
    problems = []
    for item in error.errors():
        location = [part for part in item["loc"] if part not in drop]
        if item["type"] == "extra_forbidden":
            message = unknown_field_message(str(location[-1]), known_fields(root, item["loc"]))
        else:
            message = _MESSAGES.get(item["type"], item["msg"].removeprefix("Value error, "))
        if item["type"] not in _SHOWS_NO_INPUT and not isinstance(item.get("input"), (dict, list)):
            message += f" (got {_short(repr(item['input']))})"
        if item["type"] == "literal_error" and isinstance(item.get("input"), str):
            close = closest_name(item["input"], re.findall(r"'([^']*)'", str(item.get("ctx", {}).get("expected", ""))))
            message += f"; did you mean {close!r}?" if close else ""
        problems.append((".".join(str(part) for part in location), message))
    return problems
