"""The layout of a local diffusers-format SD3 folder, checked without importing torch or loading weights."""

from __future__ import annotations

import os
from pathlib import Path

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
        return (f"{root} is not a diffusers-format SD3 folder: no {', '.join(missing)} "
                "(expected e.g. a local copy of stable-diffusion-3-medium-diffusers)")
    return None


def check_base_folder(root: str | os.PathLike) -> Path:
    """`root` as a Path; BaseModelError naming what is missing from it as a diffusers SD3 folder."""
    root = Path(root).expanduser()
    problem = base_folder_problem(root)
    if problem:
        raise BaseModelError(problem)
    return root
