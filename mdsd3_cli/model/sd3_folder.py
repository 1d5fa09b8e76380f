"""The layout of a local diffusers-format SD3 folder, checked without importing torch or loading weights."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REQUIRED_CONFIGS = {"transformer": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}
"""What a base must have to generate (the text encoders are needed only to encode new prompts)."""


class BaseModelError(ValueError):
    """A base model folder that is missing or incomplete."""


def base_folder_problem(root: Path) -> str | None:
    """What is wrong with `root` as a diffusers SD3 folder, or None when its layout fits."""
    if not root.is_dir():
        return f"base model folder not found: {root}"
    missing = [f"{sub}/{name}" for sub, name in REQUIRED_CONFIGS.items() if not (root / sub / name).is_file()]
    if missing:
        return (
            f"{root} is not a diffusers-format SD3 folder: no {', '.join(missing)} "
            "(expected e.g. a local copy of stable-diffusion-3-medium-diffusers)"
        )
    return None


def check_base_folder(root: str | os.PathLike) -> Path:
    """`root` as a Path; BaseModelError naming what is missing from it as a diffusers SD3 folder."""
    root = Path(root).expanduser()
    problem = base_folder_problem(root)
    if problem:
        raise BaseModelError(problem)
    return root


def largest_image_side(transformer: Mapping[str, Any], vae: Mapping[str, Any]) -> int | None:
    """The largest image side (pixels) a transformer and VAE config pair can sample: the transformer's position
    table (`pos_embed_max_size` patches) times its patch size times the VAE's downscale (a pixel codec's `factor`,
    else 2 per VAE block after the first). None when the transformer sets no limit."""
    table = transformer.get("pos_embed_max_size")
    if table is None:
        return None
    downscale = vae.get("factor") or 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)
    return int(table) * int(transformer.get("patch_size", 2)) * int(downscale)


def folder_image_side_limit(root: Path) -> int | None:
    """`largest_image_side` from a base folder's transformer/config.json and vae/config.json (no weights read);
    ValueError naming the file when a config is unreadable."""
    configs = []
    for sub in ("transformer", "vae"):
        path = Path(root) / sub / "config.json"
        try:
            configs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: unreadable model config ({error})") from None
        if not isinstance(configs[-1], dict):
            raise ValueError(f"{path}: a model config is a JSON object")
    try:
        return largest_image_side(*configs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{Path(root)}: model configs give no usable size limit ({error})") from None
