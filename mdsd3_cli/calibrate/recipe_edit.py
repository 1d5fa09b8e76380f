"""The calibrated recipe: the given recipe's data (with its `--set` overrides) where each calibrated class's ratio,
in every variant that uses it, becomes `{quantiles: [...]}`; relative paths are rewritten to stay correct from
the new file's folder. Everything else is kept as given."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mdsd3_cli.model.presets import is_preset
from mdsd3_cli.recipe.generate import TINY_BASE, QuantileRatio, Recipe, Variant, parse_recipe


def uses(variant: Variant, name: str) -> bool:
    """Whether a variant can give class `name` a ratio above 0."""
    spec = variant.classes.get(name, 0.0)
    if isinstance(spec, QuantileRatio):
        return spec.quantiles[-1] > 0
    return (spec[1] if isinstance(spec, list) else spec) > 0


def variants_using(recipe: Recipe, name: str) -> list[Variant]:
    """The variants a calibration of class `name` rewrites (and its check sets draw from)."""
    return [variant for variant in recipe.variants if uses(variant, name)]


def _moved(recipe: Recipe, raw: str, folder: Path) -> str:
    """A path field's value for a recipe file in `folder`: absolute and `~` paths unchanged, relative ones
    re-expressed from `folder`."""
    if Path(raw).expanduser().is_absolute():
        return raw
    return os.path.relpath(recipe.resolve(raw), folder)


def calibrated_data(
    data: Mapping[str, Any], recipe: Recipe, quantiles: Mapping[str, list[float]], out: Path
) -> dict[str, Any]:
    """The recipe data to write at `out`: `quantiles[name]` replaces class `name`'s ratio in each variant using it."""
    result = copy.deepcopy(dict(data))
    for index, variant in enumerate(recipe.variants):
        for name, values in quantiles.items():
            if uses(variant, name):
                result["variants"][index]["classes"][name] = {"quantiles": list(values)}
    folder = Path(os.path.abspath(out)).parent
    model, source = result["model"], recipe.model
    if source.base != TINY_BASE and not is_preset(source.base):
        model["base"] = _moved(recipe, source.base, folder)
    if source.adapter is not None and not is_preset(source.adapter):
        model["adapter"] = _moved(recipe, source.adapter, folder)
    if source.prompt_cache is not None:
        model["prompt_cache"] = _moved(recipe, source.prompt_cache, folder)
    result["input"]["paths"] = [_moved(recipe, raw, folder) for raw in recipe.input.paths]
    result["output"]["dir"] = _moved(recipe, recipe.output.dir, folder)
    return result


def recipe_text(data: Mapping[str, Any], header: str, out: Path) -> str:
    """The YAML of `data` under a comment `header`, checked to load as a recipe at `out` (RecipeError if not)."""
    parse_recipe(data, out)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=None, width=120)
