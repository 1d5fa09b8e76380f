"""The model side of a calibration: probe photos from the recipe's inputs, the ratio sweep and the check sets,
sampled through the Python API's `Synthesizer` (generate's model, batching and bytes) and measured in memory with
evaluate's estimators. Nothing is written to disk."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich.console import Console

from mdsd3_cli.evaluate.estimators import Reference
from mdsd3_cli.evaluate.measures import measure_pair
from mdsd3_cli.model.sampler import SampleRequest
from mdsd3_cli.pipeline.inputs import load_input
from mdsd3_cli.pipeline.requests import sample_request
from mdsd3_cli.pipeline.synthesizer import Synthesizer
from mdsd3_cli.recipe.generate import Recipe, Variant
from mdsd3_cli.util.images import ImageError, discover_sources
from mdsd3_cli.util.progress import RunProgress

SWEEP_VARIANT = "calibrate:sweep:{name}"
"""The variant name in the seeds of a class's sweep samples (`requests.sample_seed`), so they never equal a
generated sample's; the grid index is the repeat. These variants name seeds, not output folders."""
ZERO_VARIANT = "calibrate:sweep"
"""The variant name in the seeds of the ratio-0 samples, shared by every class."""


class ProbeError(ValueError):
    """The recipe's inputs give no usable probe photo."""


@dataclass(frozen=True)
class Probe:
    """One probe photo as the model sees it (fitted by the recipe's input settings), and its estimator planes."""

    key: str
    pixels: np.ndarray

    def reference(self) -> Reference:
        return Reference(self.pixels)


def pick_probes(recipe: Recipe, count: int) -> tuple[list[Probe], list[str]]:
    """`count` photos of the recipe's inputs spread evenly over their sorted keys (unreadable ones are replaced by
    the next ones) and what was skipped; ProbeError when none can be read."""
    discovery = discover_sources(recipe.input_paths(), recursive=recipe.input.recursive, exclude=[recipe.output_dir()])
    sources = sorted(discovery.sources, key=lambda source: source.key)
    if not sources:
        raise ProbeError(f"{recipe.source_path}: input.paths holds no image to probe the model with")
    spread = sorted({round(index) for index in np.linspace(0, len(sources) - 1, min(count, len(sources)))})
    order = spread + [index for index in range(len(sources)) if index not in spread]
    probes, skipped = [], []
    for index in order:
        if len(probes) == count:
            break
        source = sources[index]
        try:
            image = load_input(source.path, recipe.input)
        except ImageError as error:
            skipped.append(f"{source.path}: {error.reason}")
            continue
        probes.append(Probe(source.key, image.pixels))
    if not probes:
        raise ProbeError(f"{recipe.source_path}: none of the input images can be read: " + "; ".join(skipped[:3]))
    return probes, skipped


@dataclass(frozen=True)
class Job:
    """One sample to make and measure: which probe photo, and the request (ratios, seed, α, β)."""

    probe: int
    request: SampleRequest


def run_jobs(
    synth: Synthesizer, probes: Sequence[Probe], jobs: Sequence[Job], description: str, console: Console | None = None
) -> list[dict[str, float]]:
    """Sample every job, batched as `generate` batches (`sampling.batch_size` at a time), and measure each image
    against its probe photo (evaluate's `measure_pair`: every class's strength), in order, with a progress bar."""
    references = [probe.reference() for probe in probes]
    measured: list[dict[str, float]] = []
    step = synth.recipe.sampling.batch_size
    with RunProgress(len(jobs), description, unit="samples", console=console) as progress:
        for start in range(0, len(jobs), step):
            batch = jobs[start : start + step]
            images = synth.sample([probes[job.probe].pixels for job in batch], [job.request for job in batch])
            measured += [measure_pair(references[job.probe], image) for job, image in zip(batch, images)]
            progress.advance(len(batch))
    return measured


def sweep(
    synth: Synthesizer, probes: Sequence[Probe], names: Sequence[str], grid: np.ndarray, console: Console | None = None
) -> dict[str, np.ndarray]:
    """Strength [probe, grid point] of each class with that class alone at each ratio of `grid` (grid[0] is 0:
    that sample, the photo as the model reproduces it, is made once per probe and read by every class). Seeds
    come from the recipe seed, the probe's key, the class and the grid index, never from the recipe's ratios."""
    recipe, classes = synth.recipe, synth.classes
    jobs = []
    for index, probe in enumerate(probes):
        zero = Variant.model_construct(name=ZERO_VARIANT, classes={})
        jobs.append(Job(index, sample_request(recipe, probe.key, zero, 0, classes)))
        for name in names:
            for point, ratio in enumerate(grid[1:], start=1):
                alone = Variant.model_construct(name=SWEEP_VARIANT.format(name=name), classes={name: float(ratio)})
                jobs.append(Job(index, sample_request(recipe, probe.key, alone, point, classes)))
    measured = iter(run_jobs(synth, probes, jobs, "calibrate: sweep ratios", console))
    strengths = {name: np.empty((len(probes), len(grid))) for name in names}
    for index in range(len(probes)):
        zero = next(measured)
        for name in names:
            strengths[name][index] = [zero[name], *(next(measured)[name] for _ in grid[1:])]
    return strengths


def check_jobs(
    recipe: Recipe, synth: Synthesizer, probes: Sequence[Probe], name: str, variants: Sequence[Variant], count: int
) -> list[Job]:
    """`count` check samples of class `name` alone, drawn as `generate` draws them: probe photos x `variants`
    (those using the class) x repeats 1, 2, ... (as many as needed), each with its `requests.sample_seed`, the class's
    ratio from `requests.draw_ratios` and the variant's α and β. The same seeds for the recipe as given and the
    calibrated one (same variant names), so before and after differ only by the ratios."""
    repeats = math.ceil(count / (len(probes) * len(variants)))
    # the class alone: each class's draw depends only on the seed and its own spec (`draw_ratios`)
    alone = [variant.model_copy(update={"classes": {name: variant.classes.get(name, 0.0)}}) for variant in variants]
    jobs = []
    for repeat in range(1, repeats + 1):
        for index, probe in enumerate(probes):
            for variant in alone:
                jobs.append(Job(index, sample_request(recipe, probe.key, variant, repeat, synth.classes)))
    return jobs[:count]
