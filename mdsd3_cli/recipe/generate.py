"""Recipe schema and YAML loading: every mistake is reported, naming the file and the field,
before any model loads."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from mdsd3_cli.model.adapter import WEIGHTS_NAME, AdapterError, read_adapter_config
from mdsd3_cli.model.grid_shifts import GRID_SHIFTS
from mdsd3_cli.model.heads import is_ratio
from mdsd3_cli.model.presets import (
    PresetNotInstalledError,
    is_preset,
    preset_adapter_dir,
    preset_base_dir,
    preset_folder,
)
from mdsd3_cli.model.sd3_folder import base_folder_problem, folder_image_side_limit, largest_image_side
from mdsd3_cli.recipe.base import TINY_BASE, RecipeError, Section, check_class_names, resolve_path
from mdsd3_cli.recipe.base import ModelSection as SharedModelSection
from mdsd3_cli.recipe.file import (
    MAX_REPEATS,
    MAX_SAMPLES_PER_INPUT,
    Problem,
    RecipeData,
    RecipeFileError,
    read_recipe,
    schema_problems,
    variant_folder,
)
from mdsd3_cli.util.names import unknown_class_message

if TYPE_CHECKING:
    import torch

VARIANT_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
GLOB_CHARACTERS = re.compile(r"[*?\[]")


MAX_QUANTILES = 101
"""Most values a `{quantiles: [...]}` ratio may list."""


class QuantileRatio(Section):
    """A ratio drawn per sample by inverse CDF from a piecewise-linear quantile function: `quantiles[k]` is the
    ratio at cumulative probability k / K (K + 1 values, non-decreasing, in [0, 1]); `mdsd3 calibrate` writes it."""

    quantiles: list[float]

    def at(self, unit: float) -> float:
        """The ratio at cumulative probability `unit` in [0, 1] (linear between neighbouring quantiles)."""
        values = self.quantiles
        position = min(max(unit, 0.0), 1.0) * (len(values) - 1)
        index = min(int(position), len(values) - 2)
        return values[index] + (values[index + 1] - values[index]) * (position - index)


def _ratio(value: Any) -> float | list[float] | QuantileRatio:
    """A class ratio: a number in [0, 1], a range [lo, hi] with 0 <= lo <= hi <= 1, or {quantiles: [q0, ..., qK]}
    (non-decreasing, in [0, 1]); ranges and quantiles are drawn per sample."""

    def number(item: Any) -> float:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ValueError(
                f"ratio must be a number in [0, 1], a range [lo, hi] or {{quantiles: [q0, ..., qK]}}, got {item!r}"
            )
        if not is_ratio(item):
            raise ValueError(f"ratio {item} is outside [0, 1]")
        return float(item)

    if isinstance(value, QuantileRatio):
        return value
    if isinstance(value, Mapping):
        if set(value) != {"quantiles"} or not isinstance(value["quantiles"], (list, tuple)):
            raise ValueError(f"a ratio mapping is {{quantiles: [q0, ..., qK]}}, got {dict(value)!r}")
        values = [number(item) for item in value["quantiles"]]
        if not 2 <= len(values) <= MAX_QUANTILES:
            raise ValueError(f"quantiles lists 2 to {MAX_QUANTILES} ratios, got {len(values)}")
        if any(high < low for low, high in zip(values, values[1:])):
            raise ValueError(f"quantiles must not decrease, got {values}")
        return QuantileRatio(quantiles=values)
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"a ratio range is [lo, hi], got {list(value)!r}")
        low, high = number(value[0]), number(value[1])
        if low > high:
            raise ValueError(f"ratio range [{low}, {high}] has lo > hi")
        return [low, high]
    return number(value)


def _ratio_data(value: float | list[float] | QuantileRatio) -> float | list[float] | dict[str, list[float]]:
    """A ratio as the recipe writes it."""
    return {"quantiles": list(value.quantiles)} if isinstance(value, QuantileRatio) else value


RatioDraw = Annotated[float | list[float] | QuantileRatio, PlainValidator(_ratio), PlainSerializer(_ratio_data)]
"""A variant's class ratio: fixed, or drawn per sample from a range or quantiles."""


class ModelSection(SharedModelSection):
    """Which base model and adapter to run, and how: the shared model section with the classes of a fresh
    adapter and torch.compile."""

    classes: Annotated[list[str], Field(min_length=1)] | None = None
    compile: bool = False

    @field_validator("classes")
    @classmethod
    def _class_names(cls, names: list[str] | None) -> list[str] | None:
        return None if names is None else check_class_names(names)


class InputSection(Section):
    """Where clean photos come from and how they are shaped for the model."""

    paths: list[str] = Field(min_length=1)
    recursive: bool = True
    size: int = Field(default=512, ge=16, multiple_of=16)
    resize: Literal["center_crop", "resize", "native"] = "center_crop"
    max_side: int = Field(default=1536, ge=16)
    max_pixels: int = Field(default=89_478_485, ge=1)
    workers: int = Field(default=2, ge=1)

    def largest_side(self) -> tuple[str, int]:
        """The largest side an input reaches the model with, and the field that sets it: input.max_side with
        `native`, else input.size."""
        return ("input.max_side", self.max_side) if self.resize == "native" else ("input.size", self.size)


TAR_SAMPLE = "key"
"""What one WebDataset sample of a webdataset-layout tar holds: a key's clean image and all its variants. Part of
the run identity: earlier versions wrote one sample per key and folder, and such a run is never resumed."""


class OutputSection(Section):
    """Where and how the pairs are written."""

    dir: str = Field(min_length=1)
    format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(default=95, ge=1, le=100)
    png_compress_level: int = Field(default=1, ge=0, le=9)
    workers: int = Field(default=2, ge=1)
    layout: Literal["folders", "webdataset"] = "folders"
    samples_per_tar: int = Field(default=200, ge=1)


MAX_START_WEIGHT = 10.0
"""Largest α and β of the start z_T = α·noise + β·clean latent: at α 10 mini's images are already saturated noise,
and far larger weights overflow to black images."""


MAX_CLASS_GUIDANCE = 20.0
"""Largest sampling.class_guidance value: beyond it a class's contribution saturates every image."""


class SamplingSection(Section):
    """Denoising settings shared by all variants."""

    steps: int = Field(default=28, ge=1)
    guidance: float = Field(default=7.0, ge=0)
    alpha: float = Field(default=1.0, gt=0, le=MAX_START_WEIGHT)
    beta: float = Field(default=0.0, ge=0, le=MAX_START_WEIGHT)
    seed: int = 0
    batch_size: int = Field(default=4, ge=1)
    grid_shifts: Literal[GRID_SHIFTS] = 1
    class_guidance: dict[str, Annotated[float, Field(ge=0, le=MAX_CLASS_GUIDANCE)]] = Field(default_factory=dict)
    """Guidance per class (docs/METHOD.md §6): a sample drawing class c (ratio > 0) adds, at each step,
    (G_c − 1)·(prediction − prediction without c), c's contribution alone scaled by G_c; 1 changes nothing."""


class Variant(Section):
    """One degraded output folder (or `repeats` folders): class ratios and optional α/β overrides."""

    name: str = Field(max_length=100)
    classes: dict[str, RatioDraw]
    repeats: int = Field(default=1, ge=1, le=MAX_REPEATS)
    alpha: Annotated[float, Field(gt=0, le=MAX_START_WEIGHT)] | None = None
    beta: Annotated[float, Field(ge=0, le=MAX_START_WEIGHT)] | None = None

    @field_validator("name")
    @classmethod
    def _plain_folder_name(cls, name: str) -> str:
        if not re.fullmatch(VARIANT_NAME_PATTERN, name):
            raise ValueError(
                f"{name!r} is not a plain folder name (letters, digits, '_', '.', '-'; starting with a letter or digit)"
            )
        return name

    def folder(self, repeat: int) -> str:
        """Output folder of one repeat (1-based): the name itself when there is a single repeat."""
        if not 1 <= repeat <= self.repeats:
            raise ValueError(f"variant {self.name!r} has repeats 1..{self.repeats}, not {repeat}")
        return variant_folder(self.name, repeat, self.repeats)

    def folders(self) -> list[str]:
        """Output folders of all repeats, in repeat order."""
        return [self.folder(repeat) for repeat in range(1, self.repeats + 1)]


class Recipe(Section):
    """A validated recipe; relative paths resolve against the folder of the recipe file."""

    model: ModelSection
    input: InputSection
    output: OutputSection
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    variants: list[Variant] = Field(min_length=1)

    _source_path: Path = PrivateAttr(default_factory=lambda: Path("recipe.yaml").absolute())
    _classes: list[str] | None = PrivateAttr(default=None)

    @property
    def source_path(self) -> Path:
        """The recipe file this recipe was read from (absolute)."""
        return self._source_path

    def resolve(self, raw: str) -> Path:
        """A path from the recipe: `~` expanded, relative paths taken against the recipe's folder."""
        return resolve_path(raw, self._source_path.parent)

    def base_dir(self) -> Path | None:
        """The diffusers SD3 folder (a shipped preset's own for `mini`), or None for the built-in `tiny` preset."""
        if self.model.base == TINY_BASE:
            return None
        return preset_folder(self.model.base) / "base" if is_preset(self.model.base) else self.resolve(self.model.base)

    def adapter_dir(self) -> Path | None:
        """The adapter folder (a shipped preset's own for `mini`), or None for a fresh untrained adapter."""
        if self.model.adapter is None:
            return None
        if is_preset(self.model.adapter):
            return preset_folder(self.model.adapter) / "adapter"
        return self.resolve(self.model.adapter)

    def samples_per_input(self) -> int:
        """Samples each input image gets: one per variant folder (repeats included)."""
        return sum(variant.repeats for variant in self.variants)

    def classes(self) -> list[str]:
        """Degradation classes in adapter order: the adapter's own, else model.classes."""
        if self._classes is None:
            adapter = self.adapter_dir()
            self._classes = list(read_adapter_config(adapter).classes if adapter else self.model.classes or [])
        return list(self._classes)

    def device(self) -> torch.device:
        """The device model.device names on this machine; RecipeError (model.device) when there is none here."""
        from mdsd3_cli.util.runtime import (
            DeviceError,
            resolve_device,
        )  # torch-free import of the recipe module stays possible

        try:
            return resolve_device(self.model.device)
        except DeviceError as error:
            raise RecipeError(str(self._source_path), [("model.device", str(error))]) from None

    def input_paths(self) -> list[str]:
        """Input folders, globs and list files with relative ones resolved against the recipe's folder."""
        return [str(self.resolve(raw)) for raw in self.input.paths]

    def output_dir(self) -> Path:
        """The output root folder."""
        return self.resolve(self.output.dir)

    def prompt_cache_dir(self, environ: Mapping[str, str] = os.environ) -> Path:
        """Prompt embedding cache: model.prompt_cache, else the default (prompts.default_cache_dir)."""
        from mdsd3_cli.model.prompts import default_cache_dir  # torch-free import of the recipe module stays possible

        if self.model.prompt_cache is not None:
            return self.resolve(self.model.prompt_cache)
        return default_cache_dir(environ)

    def variant_alpha(self, variant: Variant) -> float:
        """α of a variant: its own, else sampling.alpha."""
        return self.sampling.alpha if variant.alpha is None else variant.alpha

    def variant_beta(self, variant: Variant) -> float:
        """β of a variant: its own, else sampling.beta."""
        return self.sampling.beta if variant.beta is None else variant.beta

    def class_guidance(self) -> dict[str, float]:
        """sampling.class_guidance in class order, classes at 1 (no change) left out."""
        guidance = self.sampling.class_guidance
        return {name: guidance[name] for name in self.classes() if guidance.get(name, 1.0) != 1.0}

    def sample_class_guidance(self, ratios: Mapping[str, float]) -> dict[str, float]:
        """`class_guidance()` for the classes a sample draws (ratio > 0)."""
        return {name: value for name, value in self.class_guidance().items() if float(ratios.get(name, 0.0)) > 0.0}

    def identity(self) -> dict[str, Any]:
        """The settings that determine output pixels; a run refuses to resume into a folder made with others.

        The batch size is in: it changes the last bits of the transformer's results (CPU BLAS kernels depend on
        the matrix shapes), so a resume with another batch size would mix outputs. Other execution choices
        (workers, device, dtype, compile, prompt cache) and the input list are left out, as is the PNG
        compression level (lossless) and the quality of a PNG output.
        """
        base, adapter = self.base_dir(), self.adapter_dir()
        return {
            "model": {
                "base": self.model.base if base is None else str(base),
                "adapter": None if adapter is None else str(adapter),
                "classes": self.classes(),
            },
            "input": {
                "resize": self.input.resize,
                "size": None if self.input.resize == "native" else self.input.size,
            },
            "output": {
                "format": self.output.format,
                "quality": None if self.output.format == "png" else self.output.quality,
                **(
                    {"layout": "webdataset", "tar_sample": TAR_SAMPLE, "samples_per_tar": self.output.samples_per_tar}
                    if self.output.layout == "webdataset"
                    else {}
                ),  # a folders run keeps its old identity
            },
            "sampling": {
                "steps": self.sampling.steps,
                "guidance": self.sampling.guidance,
                "seed": self.sampling.seed,
                "batch_size": self.sampling.batch_size,
                **({"grid_shifts": self.sampling.grid_shifts} if self.sampling.grid_shifts != 1 else {}),
                **({"class_guidance": self.class_guidance()} if self.class_guidance() else {}),
            },
            "variants": [
                {
                    "name": variant.name,
                    "classes": variant.model_dump(mode="json")["classes"],
                    "repeats": variant.repeats,
                    "alpha": self.variant_alpha(variant),
                    "beta": self.variant_beta(variant),
                }
                for variant in self.variants
            ],
        }


def start_warning(recipe: Recipe) -> str | None:
    """What `check` and `generate` warn about when variants sample from a start (α, β) other than the one the
    recipe's adapter was trained for (its config's `start`; α 1, β 0 for adapters that predate it). None when
    every variant uses that start, or the adapter is fresh (untrained)."""
    adapter = recipe.adapter_dir()
    if adapter is None:
        return None
    trained = read_adapter_config(adapter).start
    others: dict[tuple[float, float], list[str]] = {}
    for variant in recipe.variants:
        alpha, beta = recipe.variant_alpha(variant), recipe.variant_beta(variant)
        if not trained.matches(alpha, beta):
            others.setdefault((alpha, beta), []).append(variant.name)
    if not others:
        return None
    used = "; ".join(
        f"variants {', '.join(names)} sample from alpha {alpha:g}, beta {beta:g}"
        for (alpha, beta), names in others.items()
    )
    return (
        f"model.adapter {recipe.model.adapter} was trained for the start {trained.describe()} "
        f"(z_T = alpha·noise + beta·clean latent), but {used}. A start the adapter was not trained for is out "
        f"of its training distribution (mini, for one, then gives dark, over-saturated images). Set sampling.alpha: "
        f"{trained.alpha:g} and sampling.beta: {trained.beta:g} (and remove the variants' own alpha/beta), or "
        "use an adapter trained with train.start set to the start you want (docs/METHOD.md §4)."
    )


_NOT_A_MAPPING = "a recipe is a YAML mapping with model, input, output, sampling and variants"


def _classes_problems(recipe: Recipe) -> tuple[list[str] | None, list[Problem]]:
    """The recipe's classes (None when they cannot be known) and what is wrong with model.adapter/classes."""
    model = recipe.model
    adapter = recipe.adapter_dir()
    if is_preset(model.adapter):
        try:
            preset_adapter_dir(model.adapter)
        except PresetNotInstalledError as error:
            return model.classes, [("model.adapter", str(error))]
    if adapter is None:
        if model.classes is None:
            return None, [("model.classes", "required when model.adapter is null (a fresh adapter)")]
        return list(model.classes), []
    if not adapter.is_dir():
        return model.classes, [("model.adapter", f"no such folder: {adapter}")]
    try:
        adapter_classes = read_adapter_config(adapter).classes
    except AdapterError as error:
        return model.classes, [("model.adapter", str(error))]
    problems = []
    if not (adapter / WEIGHTS_NAME).is_file():
        problems.append(("model.adapter", f"adapter weights not found: {adapter / WEIGHTS_NAME}"))
    if model.classes is not None and model.classes != adapter_classes:
        problems.append(("model.classes", f"{model.classes} does not match the adapter's classes {adapter_classes}"))
    return list(adapter_classes), problems


def _variant_problems(recipe: Recipe, classes: list[str] | None) -> list[Problem]:
    per_input = recipe.samples_per_input()
    if per_input > MAX_SAMPLES_PER_INPUT:  # counted before any folder list is built
        return [
            (
                "variants",
                f"{len(recipe.variants)} variants with their repeats ask for {per_input:,} samples per "
                f"input image; at most {MAX_SAMPLES_PER_INPUT:,}",
            )
        ]
    problems = []
    if classes is not None:
        for name in recipe.sampling.class_guidance:
            if name not in classes:
                problems.append((f"sampling.class_guidance.{name}", unknown_class_message(name, classes)))
    name_owner: dict[str, int] = {}
    folder_owner: dict[str, int] = {}
    for index, variant in enumerate(recipe.variants):
        if classes is not None:
            for name in variant.classes:
                if name not in classes:
                    problems.append((f"variants.{index}.classes.{name}", unknown_class_message(name, classes)))
        first = name_owner.setdefault(variant.name, index)
        if first != index:
            problems.append(
                (f"variants.{index}.name", f"duplicate variant name {variant.name!r} (also variants.{first})")
            )
            continue
        for folder in variant.folders():
            owner = folder_owner.setdefault(folder, index)
            if owner != index:
                other = recipe.variants[owner]
                problems.append(
                    (
                        f"variants.{index}",
                        f"output folder {folder!r} collides with variants.{owner} "
                        f"({other.name!r}, repeats {other.repeats})",
                    )
                )
    return problems


def _path_problems(recipe: Recipe) -> list[Problem]:
    problems = []
    base = recipe.base_dir()
    if is_preset(recipe.model.base):
        try:
            preset_base_dir(recipe.model.base)
        except PresetNotInstalledError as error:
            problems.append(("model.base", str(error)))
    elif base is not None and not base.is_dir():
        problems.append(("model.base", f"no such folder: {base} (use {TINY_BASE!r} for the built-in test preset)"))
    elif base is not None and (problem := base_folder_problem(base)):
        problems.append(("model.base", problem))
    if not problems:
        problems += _image_size_problems(recipe)
    for index, raw in enumerate(recipe.input.paths):
        path = recipe.resolve(raw)
        if path.exists() and not (path.is_file() or path.is_dir()):
            problems.append((f"input.paths.{index}", f"not a regular file or folder: {path}"))
        elif not GLOB_CHARACTERS.search(raw) and not path.exists():
            problems.append((f"input.paths.{index}", f"no such file or folder: {path}"))
    return problems


def _image_size_problems(recipe: Recipe) -> list[Problem]:
    """input.size (input.max_side with `native`) above what the base model can sample, read from its config
    files without loading weights."""
    base = recipe.base_dir()
    if base is None:
        from mdsd3_cli.model.weights import (
            TINY_TRANSFORMER,
            TINY_VAE,
        )  # the built-in preset's configs are code, not files

        limit = largest_image_side(TINY_TRANSFORMER, TINY_VAE)
    else:
        try:
            limit = folder_image_side_limit(base)
        except ValueError as error:
            return [("model.base", str(error))]
    field, side = recipe.input.largest_side()
    if limit is None or side <= limit:
        return []
    return [
        (
            field,
            f"{side} is larger than the base model {recipe.model.base!r} can take: at most {limit} pixels "
            "per side (its transformer's pos_embed_max_size x patch size x VAE downscale)",
        )
    ]


def parse_recipe(data: Any, source_path: str | os.PathLike, overridden: Mapping[str, str] | None = None) -> Recipe:
    """Validate recipe data (as read from YAML) that came from `source_path`; raise RecipeError listing
    every problem found. `overridden` maps fields set by `--set` to the override, for the messages."""
    source = str(source_path)
    if not isinstance(data, Mapping):
        raise RecipeError(source, [("", _NOT_A_MAPPING)])
    label = RecipeData(source, dict(data), dict(overridden or {})).label
    try:
        recipe = Recipe.model_validate(dict(data))
    except ValidationError as error:
        raise RecipeError(
            source, [(label(field), message) for field, message in schema_problems(error, Recipe)]
        ) from None
    recipe._source_path = Path(os.path.abspath(source_path))
    classes, problems = _classes_problems(recipe)
    problems += _variant_problems(recipe, classes)
    problems += _path_problems(recipe)
    if problems:
        raise RecipeError(source, [(label(field), message) for field, message in problems])
    recipe._classes = classes
    return recipe


def load_recipe_data(path: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[Recipe, dict[str, Any]]:
    """`load_recipe`, and the raw data it validated (overrides applied) for a tool that writes a recipe back."""
    try:
        raw = read_recipe(path, overrides, not_mapping=_NOT_A_MAPPING)
    except RecipeFileError as error:
        raise RecipeError(error.source, [(error.where, error.message)]) from None
    return parse_recipe(raw.data, path, raw.overridden), raw.data


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe file (bounded, safe YAML), apply `--set` overrides, and validate it with its paths."""
    return load_recipe_data(path, overrides)[0]


_EXAMPLE_RECIPE = """\
# mdsd3 recipe: turns folders of clean photos into a paired clean/degraded dataset.
# Relative paths are taken against the folder of this file. Check it with
# `mdsd3 check --config recipe.yaml`; change single fields with `--set sampling.steps=20`.

model:
  # "tiny" is a built-in random model for smoke tests: its images mean nothing.
  # "mini" (with adapter: mini) is a small trained demonstration model shipped in the package.
  # For real data, give a local diffusers-format SD3 folder, e.g. /models/sd3-medium.
  base: tiny
  # Trained adapter folder (adapter_config.json + adapter.safetensors);
  # null runs a fresh, untrained adapter (plain SD3 behaviour).
  adapter: null
  # Degradation classes, in order. Required when adapter is null; with an adapter,
  # leave this out (its classes are used) or repeat them exactly.
  classes: [rain, haze, noise]
  dtype: auto               # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
  device: auto              # auto | cpu | cuda | cuda:N
  prompt_cache: null        # folder; null: $MDSD3_PROMPT_CACHE, else ~/.cache/mdsd3/prompts
  compile: false            # torch.compile the transformer (slow start, faster steps)

input:
  # Folders, globs ("photos/*.jpg") or .txt files listing one path per line.
  paths: [photos/]
  recursive: true           # descend into sub folders (kept in the output keys)
  size: 512                 # output side in pixels, a multiple of 16 (unused by resize: native)
  # center_crop: scale the short side to size, keep the centre square; resize: scale to
  # size x size; native: keep the photo's own size (sides must fit max_side).
  resize: center_crop
  max_side: 1536            # native: larger inputs are skipped and recorded in errors/
  max_pixels: 89478485      # larger images are refused (decompression-bomb guard)
  workers: 2                # decoding threads

output:
  dir: out/example          # gets clean/, degraded/<variant>/, manifest/, errors/, run.json
  format: png               # png | jpeg | webp
  quality: 95               # jpeg and webp quality, 1..100
  png_compress_level: 1     # 0..9; 1 is fast, higher is smaller and much slower
  workers: 2                # encoding threads
  layout: folders           # folders | webdataset (tars/<shard>-NNNNNN.tar instead of clean/ and degraded/)
  samples_per_tar: 200      # webdataset: keys per tar (a key's sample: its clean image once + every variant)

sampling:
  steps: 28                 # denoising steps
  guidance: 7.0             # classifier-free guidance; <= 1 turns it off (twice as fast)
  alpha: 1.0                # initial latent = alpha * noise + beta * clean latent; 0 < alpha <= 10
  beta: 0.0                 # 0 <= beta <= 10; alpha + beta > 1 keeps the degradations strong. A trained
                            # adapter samples best from the start it was trained for (check warns otherwise)
  seed: 0                   # every sample's seed is a stable hash of (seed, key, variant, repeat)
  batch_size: 4             # images per transformer call on a GPU (CPU: one at a time); part of the run
                            # identity (it changes a GPU run's last bits): resuming with another is refused
  grid_shifts: 1            # 1 | 2 | 4: average each step over the token grid moved by half a token (less
                            # mosaic; 2 or 4 times the transformer work). 1 is SD3's sampler exactly
  class_guidance: {}        # per class, e.g. {rain: 1.5}: scale that class's own contribution in the samples
                            # that draw it (one more transformer pass each); 1 changes nothing

variants:                   # each writes degraded/<name>/ (or <name>_r<N>/ with repeats)
  # Fixed ratios in [0, 1]: 1 applies a class fully, 0.5 half as strongly.
  - name: rain_haze
    classes: {rain: 1.0, haze: 1.0}
  # Ranges [lo, hi] are drawn per sample from its seed ({quantiles: [q0, ..., qK]} draws from a
  # distribution instead; `mdsd3 calibrate` writes those to match a real dataset); repeats gives
  # several draws per photo; alpha and beta here override the sampling ones.
  - name: random_mix
    classes: {rain: [0.3, 1.0], haze: [0.0, 0.6]}
    repeats: 2                # at most 1000
    alpha: 0.9
    beta: 0.4
"""


def example_recipe_text() -> str:
    """A fully commented example recipe (for `mdsd3 init`); it loads once its `photos/` folder exists."""
    return _EXAMPLE_RECIPE
