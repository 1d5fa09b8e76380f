"""The hook between `generate` and the output layouts: which writer a run uses and what it already finished."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mdsd3_cli.dataset.writer import FORMAT_EXTENSIONS, DatasetWriter, completed_samples
from mdsd3_cli.generate.plan import ShardSpec, WorkItem
from mdsd3_cli.generate.webdataset_layout import WebDatasetLayoutWriter, completed_tar_samples
from mdsd3_cli.pipeline.inputs import FailedInput
from mdsd3_cli.recipe.generate import Recipe

LayoutWriter = DatasetWriter | WebDatasetLayoutWriter
"""What `generate` writes through: submit(record, clean, degraded), record_error, drain, close."""


def completed_in_layout(
    recipe: Recipe, shard: ShardSpec, plan: Callable[[], Sequence[WorkItem]]
) -> tuple[set[tuple[str, str]], dict[str, FailedInput]]:
    """(key, folder) pairs earlier runs finished in the recipe's output layout (the folders layout: every
    finished pair in the output; the webdataset layout: those of the shard's plan, which `plan()` builds), and the
    failed inputs not to retry (the webdataset layout: those of finished tars; the folders layout retries all)."""
    if recipe.output.layout == "webdataset":
        return completed_tar_samples(
            recipe.output_dir(), shard, plan(), recipe.output.samples_per_tar, FORMAT_EXTENSIONS[recipe.output.format]
        )
    return completed_samples(recipe.output_dir()), {}


def open_layout_writer(recipe: Recipe, shard: ShardSpec, plan: Callable[[], Sequence[WorkItem]]) -> LayoutWriter:
    """The writer of the recipe's `output.layout` for one shard whose plan (in plan order) `plan()` builds, which
    only the webdataset layout needs."""
    output = recipe.output
    if output.layout == "webdataset":
        return WebDatasetLayoutWriter(
            recipe.output_dir(),
            shard,
            plan(),
            output.samples_per_tar,
            output.format,
            output.quality,
            output.png_compress_level,
            output.workers,
        )
    return DatasetWriter(
        recipe.output_dir(), shard.name, output.format, output.quality, output.png_compress_level, output.workers
    )
