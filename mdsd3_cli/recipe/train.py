"""The `mdsd3 train` recipe: schema, YAML loading, `--set a.b=value` overrides and error messages.

Errors read `FILE: dotted.field: problem`, one line per problem. Relative paths (in the file and in
overrides alike) resolve against the recipe's folder; `~` expands to the home folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mdsd3_cli.model.adapter import FlowStart
from mdsd3_cli.model.presets import is_preset
from mdsd3_cli.model.sd3_folder import base_folder_problem
from mdsd3_cli.recipe.base import (
    TINY_BASE,
    ModelSection,
    RecipeError,
    Section,
    UnitRatio,
    check_class_names,
    resolve_path,
)
from mdsd3_cli.recipe.file import RecipeFileError, read_recipe, schema_problems

if TYPE_CHECKING:
    import torch

PAIR_LIST_SUFFIXES = (".csv", ".jsonl")


class TrainRecipeError(RecipeError):
    """A training recipe that cannot be used; the message names the file and the field."""


def _recipe_path(value: Any, info: ValidationInfo) -> Path:
    """A path field, resolved when validated: against the recipe's folder (`base_dir` in the validation
    context), else the working folder."""
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"a path is a string, got {type(value).__name__} {value!r}")
    return resolve_path(value, (info.context or {}).get("base_dir", os.curdir))


RecipePath = Annotated[Path, BeforeValidator(_recipe_path)]
"""An absolute path: `~` expanded, a relative one taken against the recipe's folder."""


def _existing_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ValueError(f"folder not found: {path}")
    return path


class TrainModelSection(ModelSection):
    """The shared model section: `base` defaults to the built-in tiny one; `adapter` is one to continue training."""

    base: str = TINY_BASE
    adapter: RecipePath | None = None
    prompt_cache: RecipePath | None = None

    @field_validator("base")
    @classmethod
    def _base(cls, value: str, info: ValidationInfo) -> str:
        if value == TINY_BASE or is_preset(value):
            return value
        folder = _existing_dir(_recipe_path(value, info))
        problem = base_folder_problem(folder)
        if problem:
            raise ValueError(problem)
        return str(folder)

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: Path | None) -> Path | None:
        return None if value is None else _existing_dir(value)


Weight = Annotated[float, Field(gt=0.0)]


class PairedFoldersDataset(Section):
    """A clean folder and a degraded folder; files pair by relative path without extension, or via `match`.

    `match` is a regex that must match the whole relative path (without extension, `/`-separated) of a
    degraded file; its group `stem` is the relative path (without extension) of the clean file.
    """

    name: str = Field(min_length=1)
    kind: Literal["paired_folders"]
    clean: RecipePath
    degraded: RecipePath
    match: str | None = None
    classes: dict[str, UnitRatio] = Field(min_length=1)
    weight: Weight = 1.0

    @field_validator("clean", "degraded")
    @classmethod
    def _folder(cls, value: Path) -> Path:
        return _existing_dir(value)

    @field_validator("match")
    @classmethod
    def _match(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            pattern = re.compile(value)
        except re.error as error:
            raise ValueError(f"invalid regular expression {value!r}: {error}") from error
        if "stem" not in pattern.groupindex:
            raise ValueError(f"regular expression {value!r} needs a named group (?P<stem>...)")
        return value


class PairListDataset(Section):
    """A CSV (header `clean,degraded[,classes]`) or JSONL list of pairs; paths relative to the list's folder.

    `classes` here is the default for rows that give none.
    """

    name: str = Field(min_length=1)
    kind: Literal["pair_list"]
    list: RecipePath
    classes: dict[str, UnitRatio] = Field(default_factory=dict)
    weight: Weight = 1.0

    @field_validator("list")
    @classmethod
    def _list(cls, path: Path) -> Path:
        if not path.is_file():
            raise ValueError(f"file not found: {path}")
        if path.suffix.lower() not in PAIR_LIST_SUFFIXES:
            raise ValueError(f"{path.name}: pair lists are {' or '.join(PAIR_LIST_SUFFIXES)} files")
        return path


class Mdsd3OutputDataset(Section):
    """The output folder of `mdsd3 generate`: pairs and ratios come from its `manifest/*.jsonl`."""

    name: str = Field(min_length=1)
    kind: Literal["mdsd3_output"]
    dir: RecipePath
    weight: Weight = 1.0

    @field_validator("dir")
    @classmethod
    def _dir(cls, value: Path) -> Path:
        path = _existing_dir(value)
        if not (path / "manifest").is_dir():
            raise ValueError(f"no manifest/ folder in {path} (not an mdsd3 generate output?)")
        return path


DatasetSpec = Annotated[PairedFoldersDataset | PairListDataset | Mdsd3OutputDataset, Field(discriminator="kind")]
DATASET_KINDS = ("paired_folders", "pair_list", "mdsd3_output")


class DataSection(Section):
    """Image size, augmentation, identity pairs, condition drop and loader settings.

    `resize`: `short_side` scales every image so its short side equals `resolution`; `native` keeps the
    native pixel scale (crops a `resolution` patch) and only upscales images smaller than `resolution`,
    which preserves fine degradations such as sensor noise.
    """

    resolution: int = Field(default=512, ge=16)
    resize: Literal["short_side", "native"] = "short_side"
    random_crop: bool = True
    random_flip: bool = True
    identity_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    condition_drop: float = Field(default=0.1, ge=0.0, lt=1.0)
    workers: int = Field(default=2, ge=0)
    seed: int = Field(default=0, ge=0)
    cache_latents: bool = False

    @field_validator("resolution")
    @classmethod
    def _resolution(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"{value} is not a multiple of 16 (VAE factor 8 x patch size 2)")
        return value


class TrainSection(Section):
    """Optimisation settings, and `start`: the flow's source z_T = α·ε + β·z_clean the adapter is trained for
    (docs/METHOD.md §4); α 1, β 0 (the default) is plain SD3's pure noise."""

    steps: int = Field(default=1000, gt=0)
    batch_size: int = Field(default=1, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    lr: float = Field(default=1e-4, gt=0.0)
    warmup_steps: int = Field(default=100, ge=0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    trainable: Literal["default", "lora_only"] = "default"
    lora_rank: int = Field(default=16, ge=0)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    logit_mean: float = 0.0
    logit_std: float = Field(default=1.0, gt=0.0)
    start: FlowStart = Field(default_factory=FlowStart)

    @field_validator("lora_rank")
    @classmethod
    def _lora_rank(cls, value: int, info: ValidationInfo) -> int:
        if value == 0 and info.data.get("trainable") == "lora_only":
            raise ValueError("trainable is lora_only, so lora_rank must be > 0")
        return value


class OutputSection(Section):
    """Where checkpoints, previews and logs go; `preview_every: 0` disables previews."""

    dir: RecipePath = Field(default=Path("runs/mdsd3"), validate_default=True)
    checkpoint_every: int = Field(default=500, gt=0)
    keep_checkpoints: int = Field(default=3, gt=0)
    preview_every: int = Field(default=500, ge=0)
    log_every: int = Field(default=10, gt=0)


class TrainRecipe(Section):
    """A validated training recipe; `classes` order defines the head partition."""

    model: TrainModelSection = Field(default={}, validate_default=True)
    classes: list[str] = Field(min_length=1)
    datasets: list[DatasetSpec] = Field(min_length=1)
    data: DataSection = Field(default={}, validate_default=True)
    train: TrainSection = Field(default={}, validate_default=True)
    output: OutputSection = Field(default={}, validate_default=True)

    _source: str = PrivateAttr(default="recipe")

    @property
    def source(self) -> str:
        """The recipe file it was read from, as given (for messages)."""
        return self._source

    def device(self) -> torch.device:
        """The device model.device names on this machine; TrainRecipeError (model.device) when there is none."""
        from mdsd3_cli.util.runtime import DeviceError, resolve_device  # loading a recipe loads no torch

        try:
            return resolve_device(self.model.device)
        except DeviceError as error:
            raise TrainRecipeError(self._source, [("model.device", str(error))]) from None

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        return check_class_names(value)

    @model_validator(mode="after")
    def _cross_check(self) -> TrainRecipe:
        problems = []
        seen: dict[str, int] = {}
        for index, dataset in enumerate(self.datasets):
            if dataset.name in seen:
                first = seen[dataset.name]
                problems.append(f"datasets.{index}.name: {dataset.name!r} is also the name of datasets.{first}")
            seen.setdefault(dataset.name, index)
            for name in getattr(dataset, "classes", {}):
                if name not in self.classes:
                    problems.append(
                        f"datasets.{index}.classes.{name}: unknown class; the recipe's classes are {self.classes}"
                    )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def load_train_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> TrainRecipe:
    """Read (bounded, safe YAML), override and validate a training recipe; every problem raises
    `TrainRecipeError`."""
    path = Path(path)
    try:
        raw = read_recipe(path, list(overrides), not_mapping="the recipe must be a mapping of sections")
    except RecipeFileError as error:
        raise TrainRecipeError(error.source, [(error.where, error.message)]) from None
    try:
        recipe = TrainRecipe.model_validate(raw.data, context={"base_dir": Path(os.path.abspath(path)).parent})
    except ValidationError as error:
        problems = schema_problems(error, TrainRecipe, drop=DATASET_KINDS)
        raise TrainRecipeError(raw.source, [(raw.label(field), message) for field, message in problems]) from None
    recipe._source = raw.source
    return recipe
