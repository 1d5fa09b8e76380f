"""The hook between `generate` and the output layouts (`dataset.layouts`): which writer a run uses and what it
already finished."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mdsd3_cli.dataset.layout_writer import LayoutWriter
from mdsd3_cli.dataset.layouts import OUTPUT_LAYOUTS
from mdsd3_cli.generate.plan import ShardSpec, WorkItem
from mdsd3_cli.pipeline.inputs import FailedInput
from mdsd3_cli.recipe.generate import Recipe


def completed_in_layout(
    recipe: Recipe, shard: ShardSpec, plan: Callable[[], Sequence[WorkItem]]
) -> tuple[set[tuple[str, str]], dict[str, FailedInput]]:
    """(key, folder) pairs earlier runs finished in the recipe's output layout (the folders layout: every
    finished pair in the output; the webdataset layout: those of the shard's plan, which `plan()` builds), and the
    failed inputs not to retry (the webdataset layout: those of finished tars; the folders layout retries all)."""
    layout = OUTPUT_LAYOUTS[recipe.output.layout]
    done, settled = layout.completed(recipe.output_dir(), shard.name, recipe.output, plan)
    return done, {key: FailedInput(*line) for key, line in settled.items()}


def open_layout_writer(recipe: Recipe, shard: ShardSpec, plan: Callable[[], Sequence[WorkItem]]) -> LayoutWriter:
    """The writer of the recipe's `output.layout` for one shard whose plan (in plan order) `plan()` builds, which
    only the webdataset layout needs."""
    return OUTPUT_LAYOUTS[recipe.output.layout].open(recipe.output_dir(), shard.name, recipe.output, plan)
