"""The adapter on disk: `adapter_config.json` (classes, head partition, prompt rule, base fingerprint, the
start of sampling it was trained for) plus `adapter.safetensors` (clean branch, Z layers, optional LoRA). Base weights are never stored."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mdsd3_cli.model.heads import partition_heads
from mdsd3_cli.util.atomic import atomic_write

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT_VERSION = 1
PROMPT_RULE = (
    "names of the classes with ratio > 0, in class order, joined by spaces; 'clean' when none; '' unconditional"
)


class AdapterError(ValueError):
    """An adapter that cannot be used: missing files, bad config or a base it was not made for."""


class FlowStart(BaseModel):
    """The start of the flow, z_T = α·ε + β·z_clean (docs/METHOD.md §3): what an adapter is trained for
    (`train.start`) and what a generate recipe samples from (`sampling.alpha`, `sampling.beta`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(default=1.0, gt=0)
    beta: float = Field(default=0.0, ge=0)

    @property
    def is_pure_noise(self) -> bool:
        """α 1, β 0: plain SD3's start."""
        return self.alpha == 1.0 and self.beta == 0.0

    def matches(self, alpha: float, beta: float) -> bool:
        """Whether sampling from (α, β) is this start (up to float rounding in a recipe)."""
        return math.isclose(alpha, self.alpha, abs_tol=1e-6) and math.isclose(beta, self.beta, abs_tol=1e-6)

    def describe(self) -> str:
        return f"alpha {self.alpha:g}, beta {self.beta:g}"


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
    start: FlowStart = Field(default_factory=FlowStart)
    """The start the adapter was trained for; adapters written before this field existed: α 1, β 0."""
    prediction: Literal["velocity", "residual_x0"] = "velocity"
    """What the transformer outputs: SD3's flow velocity, or (mini v3) a residual on the clean latent, x̂0 =
    z_clean + Δ̂ (+ g ⊙ (x_t − z_clean) when the output has twice the latent's channels), which the sampler turns
    into the velocity (docs/METHOD.md §7). Adapters written before this field: velocity."""
    output_conv: bool = False
    """Whether the model has the zero-initialised residual 3×3 output convolution (mini v3; docs/METHOD.md §7);
    its weights are stored with the adapter's."""
    training: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> AdapterConfig:
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
    def fresh(
        cls, classes: list[str], base_fingerprint: str, base_shape: dict[str, int], **extra: Any
    ) -> AdapterConfig:
        """Config for a new adapter on a given base."""
        partition = partition_heads(base_shape["num_attention_heads"], len(classes))
        return cls(
            classes=list(classes),
            head_partition=partition,
            base_fingerprint=base_fingerprint,
            base_shape=dict(base_shape),
            **extra,
        )


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
