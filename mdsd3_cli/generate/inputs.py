"""The inputs `generate` cannot use: how it decodes one (for `generate` and `check --decode` alike) and the list
of those that fail, with their reasons."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import rich.console

from mdsd3_cli.recipe.generate import Recipe
from mdsd3_cli.util.images import Discovery, ImageError, LoadedImage, Source, iter_loaded, load_image
from mdsd3_cli.util.progress import RunProgress


@dataclass(frozen=True)
class FailedInput:
    """An input `generate` skips (one line of OUT/errors/<shard>.jsonl): its key (None when it has none), its path
    and why."""

    key: str | None
    path: str
    reason: str


def input_loader(recipe: Recipe) -> Callable[[Source], LoadedImage]:
    """How `generate` decodes and fits one input: the recipe's input.size, resize, max_side and max_pixels."""
    settings = recipe.input

    def load(source: Source) -> LoadedImage:
        return load_image(source.path, settings.size, settings.resize, settings.max_side, settings.max_pixels)

    return load


def discovery_failures(discovery: Discovery) -> list[FailedInput]:
    """Single files discovery dropped (duplicate or unsafe key, unreadable sub folder): generate records these too."""
    return [FailedInput(error.key, error.path, error.reason) for error in discovery.errors if not error.fatal]


def decode_failures(
    recipe: Recipe, sources: Sequence[Source], console: rich.console.Console | None = None
) -> list[FailedInput]:
    """Decode every source as `generate` would (input.workers threads, a progress bar) and return those that
    fail, in key order. Nothing is written."""
    failed = []
    with RunProgress(len(sources), "decode inputs", console=console) as progress:
        for source, image in iter_loaded(sources, input_loader(recipe), workers=recipe.input.workers):
            if isinstance(image, ImageError):
                failed.append(FailedInput(source.key, str(source.path), image.reason))
            progress.advance()
    return failed
