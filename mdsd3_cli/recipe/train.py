"""The `mdsd3 train` recipe: schema, YAML loading, `--set a.b=value` overrides and error messages.

Errors read `FILE: dotted.field: problem`, one line per problem. Relative paths (in the file and in
overrides alike) resolve against the recipe's folder; `~` expands to the home folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mdsd3_cli.model.adapter import FlowStart
from mdsd3_cli.model.heads import CLEAN_PROMPT
from mdsd3_cli.model.presets import is_preset
from mdsd3_cli.model.sd3_folder import base_folder_problem
from mdsd3_cli.recipe.file import RecipeData, RecipeFileError, read_recipe, schema_problems
from mdsd3_cli.util.runtime import DeviceError, resolve_device

TINY_BASE = "tiny"
PAIR_LIST_SUFFIXES = (".csv", ".jsonl")


class TrainRecipeError(ValueError):
    """A training recipe that cannot be used; the message names the file and the field."""


def _resolve(value: Path, info: ValidationInfo) -> Path:
    """Absolute path: `~` expanded, relative paths against the recipe folder (or the working folder)."""
    value = value.expanduser()
    if not value.is_absolute():
        base_dir = (info.context or {}).get("base_dir")
        value = Path(base_dir) / value if base_dir else value
    return Path(os.path.abspath(value))


def _existing_dir(value: Path, info: ValidationInfo) -> Path:
    path = _resolve(value, info)
    if not path.is_dir():
        raise ValueError(f"folder not found: {path}")
    return path


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(_Section):
    """Which base model and (optionally) which adapter to continue training from."""

    base: str = TINY_BASE
    adapter: Path | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    prompt_cache: Path | None = None

    @field_validator("base")
    @classmethod
    def _base(cls, value: str, info: ValidationInfo) -> str:
        if value == TINY_BASE or is_preset(value):
            return value
        folder = _existing_dir(Path(value), info)
        problem = base_folder_problem(folder)
        if problem:
            raise ValueError(problem)
        return str(folder)

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _existing_dir(value, info)

    @field_validator("prompt_cache")
    @classmethod
    def _prompt_cache(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "auto":
            try:
                torch.device(value)
            except RuntimeError as error:
                raise ValueError(f"not a torch device: {value!r}") from error
        return value


Ratio = Annotated[float, Field(ge=0.0, le=1.0)]
Weight = Annotated[float, Field(gt=0.0)]


class PairedFoldersDataset(_Section):
    """A clean folder and a degraded folder; files pair by relative path without extension, or via `match`.

    `match` is a regex that must match the whole relative path (without extension, `/`-separated) of a
    degraded file; its group `stem` is the relative path (without extension) of the clean file.
    """

    name: str = Field(min_length=1)
    kind: Literal["paired_folders"]
    clean: Path
    degraded: Path
    match: str | None = None
    classes: dict[str, Ratio] = Field(min_length=1)
    weight: Weight = 1.0

    @field_validator("clean", "degraded")
    @classmethod
    def _folder(cls, value: Path, info: ValidationInfo) -> Path:
        return _existing_dir(value, info)

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


class PairListDataset(_Section):
    """A CSV (header `clean,degraded[,classes]`) or JSONL list of pairs; paths relative to the list's folder.

    `classes` here is the default for rows that give none.
    """

    name: str = Field(min_length=1)
    kind: Literal["pair_list"]
    list: Path
    classes: dict[str, Ratio] = Field(default_factory=dict)
    weight: Weight = 1.0

    @field_validator("list")
    @classmethod
    def _list(cls, value: Path, info: ValidationInfo) -> Path:
        path = _resolve(value, info)
        if not path.is_file():
            raise ValueError(f"file not found: {path}")
        if path.suffix.lower() not in PAIR_LIST_SUFFIXES:
            raise ValueError(f"{path.name}: pair lists are {' or '.join(PAIR_LIST_SUFFIXES)} files")
        return path


class Mdsd3OutputDataset(_Section):
    """The output folder of `mdsd3 generate`: pairs and ratios come from its `manifest/*.jsonl`."""

    name: str = Field(min_length=1)
    kind: Literal["mdsd3_output"]
    dir: Path
    weight: Weight = 1.0

    @field_validator("dir")
    @classmethod
    def _dir(cls, value: Path, info: ValidationInfo) -> Path:
        path = _existing_dir(value, info)
        if not (path / "manifest").is_dir():
            raise ValueError(f"no manifest/ folder in {path} (not an mdsd3 generate output?)")
        return path


DatasetSpec = Annotated[PairedFoldersDataset | PairListDataset | Mdsd3OutputDataset, Field(discriminator="kind")]
DATASET_KINDS = ("paired_folders", "pair_list", "mdsd3_output")


class DataSection(_Section):
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


class TrainSection(_Section):
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


class OutputSection(_Section):
    """Where checkpoints, previews and logs go; `preview_every: 0` disables previews."""

    dir: Path = Field(default=Path("runs/mdsd3"), validate_default=True)
    checkpoint_every: int = Field(default=500, gt=0)
    keep_checkpoints: int = Field(default=3, gt=0)
    preview_every: int = Field(default=500, ge=0)
    log_every: int = Field(default=10, gt=0)

    @field_validator("dir")
    @classmethod
    def _dir(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)


class TrainRecipe(_Section):
    """A validated training recipe; `classes` order defines the head partition."""

    model: ModelSection = Field(default={}, validate_default=True)
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
        try:
            return resolve_device(self.model.device)
        except DeviceError as error:
            raise TrainRecipeError(f"{self._source}: model.device: {error}") from None

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate class names in {value}")
        for name in value:
            if not name or name.split() != [name] or name == CLEAN_PROMPT:
                raise ValueError(f"class name {name!r} must be one word and not {CLEAN_PROMPT!r}")
        return value

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


def _format_problems(raw: RecipeData, problems: Iterable[tuple[str, str]]) -> str:
    """One `SOURCE: dotted.field: problem` line per problem (a multi-line problem without a field: one per line)."""
    lines = []
    for field, message in problems:
        if field:
            lines.append(f"{raw.source}: {raw.label(field)}: {message}")
        else:
            lines.extend(f"{raw.source}: {line}" for line in message.splitlines())
    return "\n".join(lines)


def load_train_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> TrainRecipe:
    """Read (bounded, safe YAML), override and validate a training recipe; every problem raises
    `TrainRecipeError`."""
    path = Path(path)
    try:
        raw = read_recipe(path, list(overrides), not_mapping="the recipe must be a mapping of sections")
    except RecipeFileError as error:
        raise TrainRecipeError(str(error)) from None
    try:
        recipe = TrainRecipe.model_validate(raw.data, context={"base_dir": path.parent.resolve()})
    except ValidationError as error:
        raise TrainRecipeError(_format_problems(raw, schema_problems(error, TrainRecipe, drop=DATASET_KINDS))) from None
    recipe._source = raw.source
    return recipe
