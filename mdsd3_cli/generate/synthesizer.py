"""The Python API: degrade images in memory exactly as `mdsd3 generate` does (docs/python_api.md).

A Synthesizer holds one loaded model and the recipe settings it samples with. The model is loaded, the
device and dtype are chosen, prompts are embedded (and cached), inputs are fitted to the model and batches are
sampled by the same functions `generate` uses, so an image degraded here with a sample's ratios, seed, α and β
has the bytes `generate` wrote for that sample.
"""

from __future__ import annotations

import copy
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from mdsd3_cli.generate.run import BatchSampler, needed_prompts, open_sampler, open_session, prompt_embeddings
from mdsd3_cli.util.images import ImageError, fit_image
from mdsd3_cli.util.names import unknown_class_message
from mdsd3_cli.recipe.overrides import apply_override
from mdsd3_cli.util.progress import Console
from mdsd3_cli.recipe.generate import TINY_BASE, Recipe, load_recipe, parse_recipe
from mdsd3_cli.recipe.presets import MINI, MINI_SETTINGS
from mdsd3_cli.util.runtime import resolve_dtype
from mdsd3_cli.model.sampler import SampleRequest

ImageInput = Union[Image.Image, np.ndarray]
"""A PIL image (any mode; EXIF orientation applied) or a uint8 [H, W, 3] RGB array."""
Images = Union[ImageInput, Sequence[ImageInput]]
"""One image, a uint8 [B, H, W, 3] array, or a sequence of images."""
Ratios = Mapping[str, float]
"""Class name -> ratio in [0, 1]; classes left out are 0."""

PRESET_SETTINGS: dict[str, dict[str, Any]] = {
    MINI: MINI_SETTINGS,  # configs/demo.yaml's, as `mdsd3 init --preset mini` writes them
    TINY_BASE: {"model": {"base": TINY_BASE, "classes": ["rain", "haze", "noise"]}, "input": {"size": 64},
                "sampling": {"steps": 4, "guidance": 1.0}},  # random weights: for tests, images mean nothing
}
"""Settings of `Synthesizer.from_preset`, over the recipe defaults."""


@dataclass(frozen=True)
class Pair:
    """One degraded image and what made it."""

    clean: np.ndarray
    """uint8 [H, W, 3]: the input as the model saw it (fitted by input.size and input.resize)."""
    degraded: np.ndarray
    """uint8 [H, W, 3]."""
    ratios: dict[str, float]
    """Every class's ratio, in the adapter's class order."""
    seed: int
    """The noise seed (a `generate` manifest's `seed` field)."""


class Synthesizer:
    """A loaded MDSD3 model with a recipe's sampling settings: `degrade` images in memory.

    The recipe's model, input (size, resize, max_side), sampling (steps, guidance, alpha, beta, batch_size)
    and model.device/dtype/compile settings apply; its input paths, output and variants are not used here
    (`DegradedPairs` uses the variants)."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.device = recipe.device()
        self.dtype = resolve_dtype(recipe.model.dtype, self.device)
        self.session = open_session(recipe, self.device, self.dtype)
        self.classes: list[str] = list(self.session.adapter.classes)
        sampling = recipe.sampling
        sampler = open_sampler(recipe, self.session, [])  # prompts are embedded when first needed
        self._sample = BatchSampler(sampler, sampling.steps, sampling.guidance, sampling.batch_size,
                                    Console(stderr=True))

    @classmethod
    def from_recipe(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> Synthesizer:
        """The model and settings of a recipe file; `overrides` as `--set` gives them (`sampling.steps=20`)."""
        return cls(load_recipe(path, overrides))

    @classmethod
    def from_preset(cls, name: str = "mini", classes: Sequence[str] | None = None,
                    overrides: Sequence[str] = ()) -> Synthesizer:
        """A shipped model: `mini` (with its adapter, at configs/demo.yaml's settings), or `tiny` (random weights,
        for tests; `classes` default rain, haze, noise)."""
        if name not in PRESET_SETTINGS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESET_SETTINGS)}")
        data = copy.deepcopy(PRESET_SETTINGS[name])
        if classes is not None:
            data["model"]["classes"] = list(classes)
        return cls(_settings_recipe(data, overrides, f"Synthesizer.from_preset({name!r})"))

    @classmethod
    def from_folder(cls, base: str | os.PathLike, adapter: str | os.PathLike | None = None,
                    classes: Sequence[str] | None = None, overrides: Sequence[str] = ()) -> Synthesizer:
        """A diffusers SD3 folder with a trained adapter folder (or, with `classes`, a fresh untrained one), at the
        recipe defaults (512 px centre crops, 28 steps, guidance 7) unless `overrides` change them."""
        model: dict[str, Any] = {"base": str(base), "adapter": None if adapter is None else str(adapter)}
        if classes is not None:
            model["classes"] = list(classes)
        return cls(_settings_recipe({"model": model}, overrides, "Synthesizer.from_folder"))

    def degrade(self, images: Images, classes: Ratios | Sequence[Ratios], seed: int | Sequence[int] = 0,
                alpha: float | None = None, beta: float | None = None) -> list[Pair]:
        """Degrade images with class ratios (one mapping for all, or one per image) and noise seeds (an int gives
        image i the seed `seed + i`). α and β default to the recipe's sampling.alpha and sampling.beta.

        ValueError names the image, class or ratio that cannot be used."""
        fitted = [self._fit(index, image) for index, image in enumerate(_image_list(images))]
        count = len(fitted)
        ratio_rows = [classes] * count if isinstance(classes, Mapping) else list(classes)
        seeds = [seed + index for index in range(count)] if isinstance(seed, int) else list(seed)
        if len(ratio_rows) != count or len(seeds) != count:
            raise ValueError(f"{count} images need {count} class mappings and seeds; got {len(ratio_rows)} and "
                             f"{len(seeds)}")
        alpha = self.recipe.sampling.alpha if alpha is None else alpha
        beta = self.recipe.sampling.beta if beta is None else beta
        requests = [SampleRequest(self.full_ratios(row), int(value), alpha, beta)
                    for row, value in zip(ratio_rows, seeds)]
        degraded = self.sample(fitted, requests)
        return [Pair(clean, output, dict(request.ratios), request.seed)
                for clean, output, request in zip(fitted, degraded, requests)]

    def degrade_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """A `DegradedPairs(..., degrade=False)` batch (from a DataLoader) with its `degraded` images added: float
        [B, 3, H, W] in [0, 1] on the CPU, like `clean`. Runs the model here, in the calling process."""
        clean = batch["clean"]
        pixels = list((clean * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        requests = [SampleRequest(dict(zip(self.classes, (float(value) for value in row))), int(seed), float(a), float(b))
                    for row, seed, a, b in zip(batch["ratios"], batch["seed"], batch["alpha"], batch["beta"])]
        degraded = self.sample(pixels, requests)
        return {**batch, "degraded": to_tensor(np.stack(degraded))}

    def full_ratios(self, ratios: Ratios) -> dict[str, float]:
        """Every class's ratio in class order; ValueError for an unknown class (with the closest name) or a ratio
        that is not a number in [0, 1]."""
        for name, value in ratios.items():
            if name not in self.classes:
                raise ValueError(unknown_class_message(name, self.classes))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0 \
                    or math.isnan(value):
                raise ValueError(f"ratio for class {name!r} is {value!r}; ratios are numbers in [0, 1]")
        return {name: float(ratios.get(name, 0.0)) for name in self.classes}

    def sample(self, pixels: Sequence[np.ndarray], requests: Sequence[SampleRequest]) -> list[np.ndarray]:
        """Degrade fitted uint8 [H, W, 3] images, batched as `generate` batches them: images of one size
        together, `sampling.batch_size` at a time (lowered after an out-of-memory error)."""
        sampler = self._sample.sampler
        missing = [prompt for prompt in needed_prompts(requests, self.classes, self.recipe.sampling.guidance)
                   if prompt not in sampler.prompts]
        if missing:
            sampler.prompts.update(prompt_embeddings(self.recipe, self.session, missing))
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, image in enumerate(pixels):
            by_shape[image.shape].append(index)
        outputs: list[np.ndarray] = [np.empty(0, np.uint8)] * len(pixels)
        for indexes in by_shape.values():
            while indexes:
                batch, indexes = indexes[:self._sample.batch_size], indexes[self._sample.batch_size:]
                for index, output in zip(batch, self._sample([(requests[i], pixels[i]) for i in batch])):
                    outputs[index] = output
        return outputs

    def _fit(self, index: int, image: ImageInput) -> np.ndarray:
        """An input fitted as `generate` fits a decoded file (input.size, input.resize, input.max_side)."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"image {index}: arrays must be uint8 [H, W, 3] RGB; got {image.dtype} "
                                 f"{list(image.shape)}")
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise ValueError(f"image {index}: expected a PIL image or a uint8 [H, W, 3] array, got {type(image).__name__}")
        settings = self.recipe.input
        try:
            return fit_image(image, settings.size, settings.resize, settings.max_side).pixels
        except ImageError as error:
            raise ValueError(f"image {index}: {error.reason}") from None


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).movedim(-1, -3).float() / 255


def _image_list(images: Images) -> list[ImageInput]:
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


def _settings_recipe(data: dict[str, Any], overrides: Sequence[str], label: str) -> Recipe:
    """A recipe from model/input/sampling settings: inputs and output are placeholders (the Synthesizer reads
    neither); one variant draws every class in [0, 1]. Relative paths resolve against the working folder."""
    source = Path.cwd() / label
    data = {**data, "input": {"paths": ["."], **data.get("input", {})}, "output": {"dir": "."},
            "variants": [{"name": "mix", "classes": {}}]}
    for override in overrides:
        try:
            apply_override(data, override)
        except ValueError as error:
            raise ValueError(f"{label}: --set {override}: {error}") from None
    classes = parse_recipe(data, source).classes()
    data["variants"] = [{"name": "mix", "classes": {name: [0.0, 1.0] for name in classes}}]
    return parse_recipe(data, source)
