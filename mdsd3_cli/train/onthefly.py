"""On-the-fly pairs for training loops: a torch Dataset of clean images degraded by a Synthesizer
(docs/python_api.md, "On-the-fly pairs").

Item `index` of epoch `e` is source image `index // V` under variant `index % V` (V variants: the recipe's, or
those `classes=`/`mode=` make), with the seed `generate` gives repeat `e + 1` of that variant: epoch 0 yields the
pairs `mdsd3 generate` writes (first repeat), each later epoch fresh draws, and the same (index, epoch) always the
same pair. A photo that does not decode is skipped as `generate` skips it: recorded in `failed`, with a warning,
and its items are made from the next photo that decodes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ValidationError
from torch.utils.data import Dataset

from mdsd3_cli.pipeline.inputs import FailedInput, discovery_failures, load_input
from mdsd3_cli.pipeline.requests import sample_request
from mdsd3_cli.pipeline.synthesizer import Synthesizer, to_tensor
from mdsd3_cli.recipe.file import schema_problems
from mdsd3_cli.recipe.generate import Variant
from mdsd3_cli.util.images import ImageError, Source, discover_sources
from mdsd3_cli.util.names import unknown_class_message

Mode = Literal["mix", "single"]
MIX_VARIANT = "mix"
"""The variant name of `mode="mix"` (and of `from_preset`/`from_folder` recipes): the seeds are theirs."""


class DegradedPairs(Dataset):
    """(clean, degraded, ratios) pairs made on the fly from folders (or globs, or list files) of clean images.

    Items are dicts: `clean` float32 [3, H, W] in [0, 1] (fitted by the recipe's input.size/resize), `ratios`
    float64 [K] in `synth.classes` order, `seed`, `alpha`, `beta`, `key`, `variant`, and, with `degrade=True`,
    `degraded` like `clean`. With `degrade=False` the model is not run here: pass each DataLoader batch through
    `synth.degrade_batch` in the main process (the way to use a GPU). Call `set_epoch` before each epoch.

    The variants are the recipe's unless `classes` or `mode` is given: `classes` names the classes (each drawn
    in [0, 1]) or maps them to ratios as a recipe variant does (a number, `[lo, hi]`, `{"quantiles": [...]}`),
    default every class; `mode="mix"` (the default then) makes one variant `mix` with all of them, `mode="single"`
    one variant per class, named after it, with that class alone.
    """

    def __init__(
        self,
        images: str | os.PathLike | Sequence[str | os.PathLike],
        synth: Synthesizer,
        degrade: bool = True,
        epoch: int = 0,
        *,
        classes: Sequence[str] | Mapping[str, Any] | None = None,
        mode: Mode | None = None,
    ) -> None:
        recipe = synth.recipe
        self.variants = (
            _variants(synth, classes, mode) if classes is not None or mode is not None else list(recipe.variants)
        )
        paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
        discovery = discover_sources(paths, recursive=recipe.input.recursive)
        fatal = [f"{error.path}: {error.reason}" for error in discovery.errors if error.fatal]
        if fatal:
            raise ValueError("unusable image paths: " + "; ".join(fatal))
        self.sources = discovery.sources
        self.failed: list[FailedInput] = discovery_failures(discovery)
        """The photos skipped (by discovery, or when an item first failed to decode in this process) and why."""
        self.synth, self.degrade, self.epoch = synth, degrade, epoch
        self._undecodable: set[int] = set()

    def __len__(self) -> int:
        return len(self.sources) * len(self.variants)

    def __repr__(self) -> str:
        return (
            f"DegradedPairs({len(self.sources)} photos x {len(self.variants)} variants "
            f"{[variant.name for variant in self.variants]} = {len(self)} items, epoch={self.epoch}, "
            f"degrade={self.degrade}, failed={len(self.failed)})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's ratios and noise (DataLoader workers copy the dataset when an epoch starts)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside 0..{len(self) - 1}")
        recipe, synth = self.synth.recipe, self.synth
        source, clean = self._decoded(index // len(self.variants))
        variant = self.variants[index % len(self.variants)]
        request = sample_request(recipe, source.key, variant, self.epoch + 1, synth.classes)
        item = {
            "clean": to_tensor(clean),
            "ratios": torch.tensor(list(request.ratios.values()), dtype=torch.float64),
            "seed": request.seed,
            "alpha": request.alpha,
            "beta": request.beta,
            "key": source.key,
            "variant": variant.name,
        }
        if self.degrade:
            item["degraded"] = to_tensor(synth.sample([clean], [request])[0])
        return item

    def _decoded(self, position: int) -> tuple[Source, np.ndarray]:
        """Source `position` decoded and fitted, else the next one (in key order, wrapping) that decodes; a photo
        that fails is recorded in `failed` with a warning, once."""
        count = len(self.sources)
        for step in range(count):
            at = (position + step) % count
            if at in self._undecodable:
                continue
            source = self.sources[at]
            try:
                return source, load_input(source.path, self.synth.recipe.input).pixels
            except ImageError as error:
                self._undecodable.add(at)
                self.failed.append(FailedInput(source.key, str(source.path), error.reason))
                warnings.warn(
                    f"DegradedPairs skips {source.path}: {error.reason} ({len(self._undecodable)} of "
                    f"{count} photos skipped so far; its items use the next photo)",
                    stacklevel=3,
                )
        reasons = "; ".join(f"{failure.path}: {failure.reason}" for failure in self.failed[:3])
        raise ValueError(f"none of the {count} photos decodes ({reasons}{'; ...' if len(self.failed) > 3 else ''})")


def _variants(
    synth: Synthesizer, classes: Sequence[str] | Mapping[str, Any] | None, mode: Mode | None
) -> list[Variant]:
    """The variants `classes` and `mode` ask for, each checked as a recipe variant is."""
    if mode is None:
        mode = "mix"
    if mode not in ("mix", "single"):
        raise ValueError(f"mode must be 'mix' or 'single'; got {mode!r}")
    if classes is None:
        classes = list(synth.classes)
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (Sequence, Mapping)):
        raise TypeError(
            f"classes must be a list of class names or a mapping of class name to ratio; got "
            f"{type(classes).__name__} {classes!r}"
        )
    specs = dict(classes) if isinstance(classes, Mapping) else {name: [0.0, 1.0] for name in classes}
    if not specs:
        raise ValueError("classes names no class")
    for name in specs:
        if name not in synth.classes:
            raise ValueError(f"classes: {unknown_class_message(name, synth.classes)}")
    groups = {MIX_VARIANT: specs} if mode == "mix" else {name: {name: spec} for name, spec in specs.items()}
    variants = []
    for name, group in groups.items():
        try:
            variants.append(Variant.model_validate({"name": name, "classes": group}))
        except ValidationError as error:
            field, message = schema_problems(error, Variant)[0]
            raise ValueError(f"classes: {field.removeprefix('classes.')}: {message}") from None
    return variants
