"""The inputs `generate` cannot use (`check --decode`): every source decoded as `generate` decodes it, and those
that fail, with their reasons."""

from __future__ import annotations

from collections.abc import Sequence

import rich.console

from mdsd3_cli.pipeline.inputs import FailedInput, load_input
from mdsd3_cli.recipe.generate import Recipe
from mdsd3_cli.util.images import ImageError, Source, iter_loaded
from mdsd3_cli.util.progress import RunProgress


def decode_failures(
    recipe: Recipe, sources: Sequence[Source], console: rich.console.Console | None = None
) -> list[FailedInput]:
    """Decode every source as `generate` would (input.workers threads, a progress bar) and return those that
    fail, in key order. Nothing is written."""
    failed = []
    with RunProgress(len(sources), "decode inputs", console=console) as progress:
        for source, image in iter_loaded(
            sources, lambda source: load_input(source.path, recipe.input), workers=recipe.input.workers
        ):
            if isinstance(image, ImageError):
                failed.append(FailedInput(source.key, str(source.path), image.reason))
            progress.advance()
    return failed
