"""On-the-fly pairs for training loops: a torch Dataset of clean images degraded by a Synthesizer
(docs/python_api.md, "On-the-fly pairs").

Item `index` of epoch `e` is source image `index // V` under the recipe's variant `index % V` (V variants),
with the seed `generate` gives repeat `e + 1` of that variant: epoch 0 yields the pairs `mdsd3 generate` writes
(first repeat), each later epoch fresh draws, and the same (index, epoch) always the same pair.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from mdsd3_cli.util.images import ImageError, discover_sources, load_image
from mdsd3_cli.generate.plan import draw_ratios, sample_seed
from mdsd3_cli.model.sampler import SampleRequest
from mdsd3_cli.generate.synthesizer import Synthesizer, to_tensor


class DegradedPairs(Dataset):
    """(clean, degraded, ratios) pairs made on the fly from folders (or globs, or list files) of clean images.

    Items are dicts: `clean` float32 [3, H, W] in [0, 1] (fitted by the recipe's input.size/resize), `ratios`
    float64 [K] in `synth.classes` order, `seed`, `alpha`, `beta`, `key`, `variant`, and, with `degrade=True`,
    `degraded` like `clean`. With `degrade=False` the model is not run here: pass each DataLoader batch through
    `synth.degrade_batch` in the main process (the way to use a GPU). Call `set_epoch` before each epoch.
    """

    def __init__(self, images: str | os.PathLike | Sequence[str | os.PathLike], synth: Synthesizer,
                 degrade: bool = True, epoch: int = 0) -> None:
        recipe = synth.recipe
        paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        discovery = discover_sources(paths, recursive=recipe.input.recursive)
        fatal = [f"{error.path}: {error.reason}" for error in discovery.errors if error.fatal]
        if fatal:
            raise ValueError("unusable image paths: " + "; ".join(fatal))
        self.sources = discovery.sources
        self.synth, self.degrade, self.epoch = synth, degrade, epoch
        self.variants = list(recipe.variants)

    def __len__(self) -> int:
        return len(self.sources) * len(self.variants)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's ratios and noise (DataLoader workers copy the dataset when an epoch starts)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside 0..{len(self) - 1}")
        recipe, synth = self.synth.recipe, self.synth
        source = self.sources[index // len(self.variants)]
        variant = self.variants[index % len(self.variants)]
        seed = sample_seed(recipe.sampling.seed, source.key, variant.name, self.epoch + 1)
        ratios = draw_ratios(variant, synth.classes, seed)
        settings = recipe.input
        try:
            clean = load_image(source.path, settings.size, settings.resize, settings.max_side, settings.max_pixels).pixels
        except ImageError as error:
            raise ImageError(f"{source.path}: {error.reason}") from None
        item = {"clean": to_tensor(clean), "ratios": torch.tensor(list(ratios.values()), dtype=torch.float64),
                "seed": seed, "alpha": recipe.variant_alpha(variant), "beta": recipe.variant_beta(variant),
                "key": source.key, "variant": variant.name}
        if self.degrade:
            request = SampleRequest(ratios, seed, item["alpha"], item["beta"])
            item["degraded"] = to_tensor(synth.sample([clean], [request])[0])
        return item
