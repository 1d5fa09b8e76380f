"""The adapter on disk: `adapter_config.json` (classes, head partition, prompt rule, base fingerprint)
plus `adapter.safetensors` (clean branch, Z layers, optional LoRA). Base weights are never stored."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mdsd3_cli.util.atomic import atomic_write
from mdsd3_cli.model.heads import partition_heads

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT_VERSION = 1
PROMPT_RULE = "names of the classes with ratio > 0, in class order, joined by spaces; 'clean' when none; '' unconditional"


class AdapterError(ValueError):
    """An adapter that cannot be used: missing files, bad config or a base it was not made for."""


class AdapterConfig(BaseModel):
    """What an adapter was trained for; saved as JSON beside its weights."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    classes: list[str] = Field(min_length=1)
    head_partition: list[list[int]]
    prompt_rule: str = PROMPT_RULE
    base_fingerprint: str
    base_shape: dict[str, int]
    lora_rank: int = 0
    lora_targets: list[str] = Field(default_factory=list)
    has_clean_branch: bool = True
    training: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "AdapterConfig":
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"duplicate class names in {self.classes}")
        for name in self.classes:
            if not name or name != name.strip() or " " in name or name in ("clean",):
                raise ValueError(f"class name {name!r} must be one word and not 'clean'")
        heads = self.base_shape.get("num_attention_heads")
        if heads is not None and self.head_partition != partition_heads(heads, len(self.classes)):
            raise ValueError("head_partition does not follow the class-to-head partition rule")
        return self

    @classmethod
    def fresh(cls, classes: list[str], base_fingerprint: str, base_shape: dict[str, int], **extra: Any) -> "AdapterConfig":
        """Config for a new adapter on a given base."""
        partition = partition_heads(base_shape["num_attention_heads"], len(classes))
        return cls(classes=list(classes), head_partition=partition, base_fingerprint=base_fingerprint,
                   base_shape=dict(base_shape), **extra)


def read_adapter_config(adapter_dir: str | os.PathLike) -> AdapterConfig:
    """Read and validate `adapter_config.json`; errors name the file."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"adapter config not found: {path}")
    try:
        data = json.loads(path.read_text())
        return AdapterConfig.model_validate(data)
    except (json.JSONDecodeError, ValidationError) as error:
        raise AdapterError(f"invalid adapter config {path}: {error}") from error


def write_adapter_config(adapter_dir: str | os.PathLike, config: AdapterConfig) -> Path:
    """Write the config atomically."""
    path = Path(adapter_dir) / CONFIG_NAME
    atomic_write(path, (config.model_dump_json(indent=2) + "\n").encode())
    return path
