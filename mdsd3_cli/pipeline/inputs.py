"""Inputs as the model sees them: a recipe's input section applied to a file or an image, and the record of an
input that cannot be used."""

from __future__ import annotations

import os
from dataclasses import dataclass

from PIL import Image

from mdsd3_cli.recipe.generate import InputSection
from mdsd3_cli.util.images import Discovery, LoadedImage, fit_image, load_image


@dataclass(frozen=True)
class FailedInput:
    """An input `generate` skips (one line of OUT/errors/<shard>.jsonl): its key (None when it has none), its path
    and why."""

    key: str | None
    path: str
    reason: str


def load_input(path: str | os.PathLike, settings: InputSection) -> LoadedImage:
    """An image file decoded and fitted by input.size, resize, max_side and max_pixels; ImageError when it cannot
    be."""
    return load_image(path, settings.size, settings.resize, settings.max_side, settings.max_pixels)


def fit_input(image: Image.Image, settings: InputSection) -> LoadedImage:
    """A decoded image fitted as `load_input` fits a file (input.size, resize and max_side)."""
    return fit_image(image, settings.size, settings.resize, settings.max_side)


def discovery_failures(discovery: Discovery) -> list[FailedInput]:
    """Single files discovery dropped (duplicate or unsafe key, unreadable sub folder): generate records these too."""
    return [FailedInput(error.key, error.path, error.reason) for error in discovery.errors if not error.fatal]
