"""The Python API: degrade images in memory exactly as `mdsd3 generate` does (docs/python_api.md).

A Synthesizer holds one loaded model and the recipe settings it samples with. The model is loaded, the
device and dtype are chosen, prompts are embedded (and cached), inputs are fitted to the model and batches are
sampled by the same functions `generate` uses, so an image degraded here with a sample's ratios, seed, α and β
has the bytes `generate` wrote for that sample.
"""

from __future__ import annotations

import copy
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError

from mdsd3_cli.model.heads import is_ratio
from mdsd3_cli.model.sampler import SampleRequest
from mdsd3_cli.pipeline.inputs import fit_input, load_input
from mdsd3_cli.pipeline.pipeline import MDSD3Pipeline
from mdsd3_cli.recipe.generate import (
    TINY_BASE,
    ModelSection,
    Recipe,
    SamplingSection,
    Variant,
    load_recipe,
    parse_recipe,
)
from mdsd3_cli.recipe.overrides import apply_override
from mdsd3_cli.recipe.presets import MINI, MINI_SETTINGS
from mdsd3_cli.util.images import ImageError
from mdsd3_cli.util.names import unknown_class_message
from mdsd3_cli.util.progress import Console
from mdsd3_cli.util.runtime import resolve_dtype

ImageInput = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike
"""A PIL image (any mode; EXIF orientation applied), an [H, W, 3] RGB array or a [3, H, W] tensor (uint8, or float
in [0, 1]), or the path of an image file (decoded as `generate` decodes its inputs)."""
Images = ImageInput | Sequence[ImageInput]
"""One image, a [B, H, W, 3] array or [B, 3, H, W] tensor, or a sequence of images."""
Ratios = Mapping[str, float]
"""Class name -> ratio in [0, 1]; classes left out are 0."""
OutputType = Literal["np", "pt", "pil"]
"""What a Pair holds: "np" uint8 [H, W, 3] arrays, "pt" float32 [3, H, W] tensors in [0, 1] (as `DegradedPairs`
items), "pil" RGB PIL images."""
PairImage = np.ndarray | torch.Tensor | Image.Image

OUTPUT_TYPES = ("np", "pt", "pil")
SEED_LIMIT = 2**64
"""Seeds are integers in [0, 2**64): the range of a torch generator's seed."""

PRESET_SETTINGS: dict[str, dict[str, Any]] = {
    MINI: MINI_SETTINGS,  # configs/demo.yaml's, as `mdsd3 init --preset mini` writes them
    TINY_BASE: {
        "model": {"base": TINY_BASE, "classes": ["rain", "haze", "noise"]},
        "input": {"size": 64},
        "sampling": {"steps": 4, "guidance": 1.0},
    },  # random weights: for tests, images mean nothing
}
"""Settings of `Synthesizer.from_preset`, over the recipe defaults."""


@dataclass(frozen=True, repr=False)
class Pair:
    """One degraded image and what made it."""

    clean: PairImage
    """The input as the model saw it (fitted by input.size and input.resize), as `output_type` asked."""
    degraded: PairImage
    """Like `clean`."""
    ratios: dict[str, float]
    """Every class's ratio, in the adapter's class order."""
    seed: int
    """The noise seed (a `generate` manifest's `seed` field)."""

    def __repr__(self) -> str:
        ratios = ", ".join(f"{name!r}: {value:g}" for name, value in self.ratios.items())
        return (
            f"Pair(clean={_describe(self.clean)}, degraded={_describe(self.degraded)}, ratios={{{ratios}}}, "
            f"seed={self.seed})"
        )


class Synthesizer:
    """A loaded MDSD3 model with a recipe's sampling settings: `degrade` images in memory.

    The recipe's model, input (size, resize, max_side, max_pixels), sampling (steps, guidance, alpha, beta,
    batch_size) and model.device/dtype/compile settings apply; its input paths, output and variants are not used
    here (`DegradedPairs` uses the variants)."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.device = recipe.device()
        self.dtype = resolve_dtype(recipe.model.dtype, self.device)
        self.pipeline = MDSD3Pipeline.from_recipe(recipe, self.device, self.dtype, Console(stderr=True))
        self.classes: list[str] = self.pipeline.classes

    def __repr__(self) -> str:
        model, sampling, settings = self.recipe.model, self.recipe.sampling, self.recipe.input
        return (
            f"Synthesizer(base={model.base!r}, adapter={model.adapter!r}, classes={self.classes}, "
            f"device={str(self.device)!r}, dtype={str(self.dtype).removeprefix('torch.')!r}, "
            f"size={settings.size}, resize={settings.resize!r}, steps={sampling.steps}, "
            f"guidance={sampling.guidance:g}, alpha={sampling.alpha:g}, beta={sampling.beta:g})"
        )

    @classmethod
    def from_recipe(
        cls,
        path: str | os.PathLike,
        overrides: Sequence[str] = (),
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Synthesizer:
        """The model and settings of a recipe file; `overrides` as `--set` gives them (`sampling.steps=20`);
        `device` and `dtype` set model.device and model.dtype."""
        return cls(load_recipe(path, [*overrides, *_device_overrides(device, dtype)]))

    @classmethod
    def from_preset(
        cls,
        name: str = "mini",
        classes: Sequence[str] | None = None,
        overrides: Sequence[str] = (),
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Synthesizer:
        """A shipped model: `mini` (with its adapter, at configs/demo.yaml's settings), or `tiny` (random weights,
        for tests; `classes` default rain, haze, noise)."""
        if name not in PRESET_SETTINGS:
            raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESET_SETTINGS)}")
        data = copy.deepcopy(PRESET_SETTINGS[name])
        if classes is not None:
            data["model"]["classes"] = list(classes)
        return cls(
            _settings_recipe(
                data, [*overrides, *_device_overrides(device, dtype)], f"Synthesizer.from_preset({name!r})"
            )
        )

    @classmethod
    def from_folder(
        cls,
        base: str | os.PathLike,
        adapter: str | os.PathLike | None = None,
        classes: Sequence[str] | None = None,
        overrides: Sequence[str] = (),
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Synthesizer:
        """A diffusers SD3 folder with a trained adapter folder (or, with `classes`, a fresh untrained one), at the
        recipe defaults (512 px centre crops, 28 steps, guidance 7) unless `overrides` change them."""
        model: dict[str, Any] = {"base": str(base), "adapter": None if adapter is None else str(adapter)}
        if classes is not None:
            model["classes"] = list(classes)
        return cls(
            _settings_recipe(
                {"model": model}, [*overrides, *_device_overrides(device, dtype)], "Synthesizer.from_folder"
            )
        )

    def degrade(
        self,
        images: Images,
        classes: Ratios | Sequence[Ratios],
        seed: int | Sequence[int] = 0,
        alpha: float | None = None,
        beta: float | None = None,
        output_type: OutputType = "np",
    ) -> list[Pair]:
        """Degrade images with class ratios (one mapping for all, or one per image) and noise seeds (an integer in
        [0, 2**64) gives image i the seed `seed + i`). α and β default to the recipe's sampling.alpha and
        sampling.beta and are held to the recipe's bounds.

        TypeError or ValueError names the argument (`images[1]`, `seed`, `alpha`, a class or its ratio) that cannot
        be used."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}; got {output_type!r}")
        fitted = [self._fit(label, image) for label, image in _labelled_images(images)]
        count = len(fitted)
        ratio_rows = _ratio_rows(classes, count)
        seeds = _seeds(seed, count)
        alpha, beta = _start(
            self.recipe.sampling.alpha if alpha is None else alpha, self.recipe.sampling.beta if beta is None else beta
        )
        requests = [self.request(self.full_ratios(row), value, alpha, beta) for row, value in zip(ratio_rows, seeds)]
        degraded = self.sample(fitted, requests)
        return [
            Pair(_as_output(clean, output_type), _as_output(output, output_type), dict(request.ratios), request.seed)
            for clean, output, request in zip(fitted, degraded, requests)
        ]

    def degrade_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """A `DegradedPairs(..., degrade=False)` batch (from a DataLoader) with its `degraded` images added: float
        [B, 3, H, W] in [0, 1] on the device of `clean`, like `clean`. Runs the model here, in the calling process;
        ratios, seeds, α and β are checked as `degrade` checks them."""
        clean = batch["clean"]
        pixels = list((clean.detach().cpu() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        requests = [
            self.request(
                self.full_ratios(dict(zip(self.classes, row.tolist()))),
                _seed(seed, f"batch['seed'][{index}]"),
                *_start(float(a), float(b)),
            )
            for index, (row, seed, a, b) in enumerate(
                zip(batch["ratios"], batch["seed"], batch["alpha"], batch["beta"])
            )
        ]
        degraded = self.sample(pixels, requests)
        return {**batch, "degraded": to_tensor(np.stack(degraded)).to(clean.device)}

    def request(self, ratios: dict[str, float], seed: int, alpha: float, beta: float) -> SampleRequest:
        """One sample's request, with the recipe's class guidance for the classes it draws."""
        return SampleRequest(ratios, seed, alpha, beta, self.recipe.sample_class_guidance(ratios))

    def full_ratios(self, ratios: Ratios) -> dict[str, float]:
        """Every class's ratio in class order; ValueError for an unknown class (with the closest name) or a ratio
        that is not a number in [0, 1] (Python and numpy numbers are taken, bools are not)."""
        for name, value in ratios.items():
            if name not in self.classes:
                raise ValueError(unknown_class_message(name, self.classes))
            if not is_ratio(value):
                raise ValueError(f"ratio for class {name!r} is {value!r}; ratios are numbers in [0, 1]")
        return {name: float(ratios.get(name, 0.0)) for name in self.classes}

    def sample(self, pixels: Sequence[np.ndarray], requests: Sequence[SampleRequest]) -> list[np.ndarray]:
        """Degrade fitted uint8 [H, W, 3] images, batched as `generate` batches them: images of one size
        together, `sampling.batch_size` at a time (lowered after an out-of-memory error)."""
        sampling = self.recipe.sampling
        return self.pipeline.sample(pixels, requests, sampling.steps, sampling.guidance)

    def _fit(self, label: str, image: ImageInput) -> np.ndarray:
        """An input fitted as `generate` fits a decoded file (input.size, input.resize, input.max_side); a path is
        decoded as `generate` decodes it (input.max_pixels too)."""
        settings = self.recipe.input
        try:
            if isinstance(image, (str, os.PathLike)):
                return load_input(image, settings).pixels
            if not isinstance(image, Image.Image):
                image = Image.fromarray(_uint8_pixels(label, image))
            return fit_input(image, settings).pixels
        except ImageError as error:
            where = f" ({os.fspath(image)})" if isinstance(image, (str, os.PathLike)) else ""
            raise ValueError(f"{label}{where}: {error.reason}") from None


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).movedim(-1, -3).float() / 255


def _as_output(pixels: np.ndarray, output_type: OutputType) -> PairImage:
    if output_type == "pt":
        return to_tensor(pixels)
    return Image.fromarray(pixels) if output_type == "pil" else pixels


def _describe(image: PairImage) -> str:
    """`uint8[128, 128, 3]`, `torch.float32[3, 128, 128]` or `PIL.Image RGB 128x128`: an image without its pixels."""
    if isinstance(image, Image.Image):
        return f"PIL.Image {image.mode} {image.width}x{image.height}"
    return f"{image.dtype}{list(image.shape)}"


_IMAGE_KINDS = "a PIL image, an [H, W, 3] array, a [3, H, W] tensor or an image file's path"


def _labelled_images(images: Images) -> list[tuple[str, ImageInput]]:
    """Each image with the name errors give it: `images[i]`."""
    if isinstance(images, (Image.Image, str, os.PathLike)):
        items: list[Any] = [images]
    elif isinstance(images, (np.ndarray, torch.Tensor)):
        items = list(images) if images.ndim == 4 else [images]
    elif isinstance(images, Sequence) and not isinstance(images, bytes):
        items = list(images)
    else:
        raise TypeError(f"images must be {_IMAGE_KINDS}, a batch of them or a list; got {type(images).__name__}")
    return [(f"images[{index}]", image) for index, image in enumerate(items)]


def _uint8_pixels(label: str, image: Any) -> np.ndarray:
    """An [H, W, 3] array or a [3, H, W] tensor, uint8 or float in [0, 1], as uint8 [H, W, 3]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"{label}: tensors are [3, H, W] RGB (a batch [B, 3, H, W]); got shape {list(image.shape)}"
            )
        tensor = image.detach().cpu()
        image = np.ascontiguousarray((tensor.double() if tensor.is_floating_point() else tensor).permute(1, 2, 0))
    elif not isinstance(image, np.ndarray):
        raise TypeError(f"{label}: expected {_IMAGE_KINDS}; got {type(image).__name__}")
    elif image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{label}: arrays are [H, W, 3] RGB (a batch [B, H, W, 3]); got shape {list(image.shape)}")
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"{label}: pixels of dtype {image.dtype} are not taken; use uint8 (0-255) or float (0-1)")
    if image.size and not (np.isfinite(image).all() and 0.0 <= image.min() and image.max() <= 1.0):
        finite = image[np.isfinite(image)]
        found = [f"values {finite.min():g} to {finite.max():g}"] if finite.size else []
        found += [f"{image.size - finite.size} NaN or infinite values"] if finite.size < image.size else []
        raise ValueError(f"{label}: float pixels are taken as [0, 1]; found {' and '.join(found)}")
    return np.rint(image.astype(np.float64) * 255).astype(np.uint8)


def _is_number(value: Any) -> bool:
    """A Python or numpy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    """A Python or numpy integer (or a one-element integer tensor, as a DataLoader batch holds), not a bool."""
    if isinstance(value, torch.Tensor):
        return (
            value.numel() == 1
            and not value.is_floating_point()
            and not value.is_complex()
            and value.dtype != torch.bool
        )
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _seed(value: Any, label: str) -> int:
    if not _is_integer(value):
        raise TypeError(f"{label} must be an integer in [0, 2**64); got {type(value).__name__} {value!r}")
    seed = int(value)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{label} is {seed}; seeds are integers in [0, 2**64)")
    return seed


def _seeds(seed: Any, count: int) -> list[int]:
    """One seed per image: `seed + i` from one integer, else one given per image."""
    if _is_integer(seed):
        first = _seed(seed, "seed")
        return [_seed(first + index, f"seed + {index} (the seed of images[{index}])") for index in range(count)]
    if isinstance(seed, (str, bytes)) or not isinstance(seed, (Sequence, np.ndarray, torch.Tensor)):
        raise TypeError(f"seed must be an integer in [0, 2**64) or one per image; got {type(seed).__name__} {seed!r}")
    seeds = [_seed(value, f"seed[{index}]") for index, value in enumerate(seed)]
    if len(seeds) != count:
        raise ValueError(f"{count} images need {count} seeds; got {len(seeds)}")
    return seeds


def _ratio_rows(classes: Any, count: int) -> list[Ratios]:
    """One class-ratio mapping per image."""
    if isinstance(classes, Mapping):
        return [classes] * count
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise TypeError(
            f"classes must be a mapping of class name to ratio, or a list of them (one per image); got "
            f"{type(classes).__name__} {classes!r}"
        )
    for index, row in enumerate(classes):
        if not isinstance(row, Mapping):
            raise TypeError(f"classes[{index}] must be a mapping of class name to ratio; got {type(row).__name__}")
    if len(classes) != count:
        raise ValueError(f"{count} images need {count} class mappings; got {len(classes)}")
    return list(classes)


def _start(alpha: Any, beta: Any) -> tuple[float, float]:
    """α and β as floats, held to the recipe's sampling.alpha and sampling.beta rules (finite, 0 < α <= 10,
    0 <= β <= 10)."""
    for label, value in (("alpha", alpha), ("beta", beta)):
        if not _is_number(value):
            raise TypeError(f"{label} must be a number; got {type(value).__name__} {value!r}")
    try:
        checked = SamplingSection.model_validate({"alpha": float(alpha), "beta": float(beta)})
    except ValidationError as error:
        problem = error.errors()[0]
        field = problem["loc"][0]
        raise ValueError(f"{field} is {problem['input']!r}: {problem['msg'].lower()}") from None
    return checked.alpha, checked.beta


def _device_overrides(device: str | torch.device | None, dtype: str | torch.dtype | None) -> list[str]:
    """`device=` and `dtype=` as model.device and model.dtype overrides, checked by the recipe's rules."""
    settings: dict[str, str] = {}
    for label, value, kind in (("device", device, torch.device), ("dtype", dtype, torch.dtype)):
        if value is None:
            continue
        if not isinstance(value, (str, kind)):
            raise TypeError(
                f"{label} must be a string or a {kind.__module__}.{kind.__name__}; got {type(value).__name__} {value!r}"
            )
        settings[label] = str(value).removeprefix("torch.")
    try:
        ModelSection.model_validate({"base": "-", **settings})
    except ValidationError as error:
        problem = error.errors()[0]
        field = problem["loc"][0]
        raise ValueError(f"{field}={settings[field]!r}: {problem['msg']}") from None
    return [f"model.{name}={value}" for name, value in settings.items()]


def _settings_recipe(data: dict[str, Any], overrides: Sequence[str], label: str) -> Recipe:
    """A recipe from model/input/sampling settings, parsed once: inputs and output are placeholders (the Synthesizer
    reads neither); one variant `mix` draws every class in [0, 1]. Relative paths resolve against the working
    folder."""
    source = Path.cwd() / label
    data = {
        **data,
        "input": {"paths": ["."], **data.get("input", {})},
        "output": {"dir": "."},
        "variants": [{"name": "mix", "classes": {}}],
    }
    for override in overrides:
        try:
            apply_override(data, override)
        except ValueError as error:
            raise ValueError(f"{label}: --set {override}: {error}") from None
    recipe = parse_recipe(data, source)
    recipe.variants = [Variant(name="mix", classes={name: [0.0, 1.0] for name in recipe.classes()})]
    return recipe
