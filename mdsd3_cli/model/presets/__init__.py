"""Trained presets shipped as package data: `model.base: mini` / `model.adapter: mini` name folders in here.

A preset is data, not code: `<name>/base/` is a base folder (transformer/, vae/, scheduler/, text_encoder/) and
`<name>/adapter/` an adapter folder, read by the same loaders as a user's own folders. Torch-free, so recipes
can resolve preset names without loading a model.
"""

from __future__ import annotations

from pathlib import Path

PRESETS_ROOT = Path(__file__).resolve().parent
PRESETS = ("mini",)
REPRODUCE = {"mini": "python scripts/train_mini.py (see its --help)"}


class PresetNotInstalledError(FileNotFoundError):
    """A preset name whose weights are not in the package."""


def is_preset(name: str | None) -> bool:
    return name in PRESETS


def preset_folder(name: str) -> Path:
    """The preset's root folder (base/ + adapter/), whether or not its weights are installed."""
    return PRESETS_ROOT / name


def preset_base_dir(name: str) -> Path:
    """`<preset>/base`; raises PresetNotInstalledError when its transformer weights are missing."""
    folder = preset_folder(name) / "base"
    if not (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file():
        raise PresetNotInstalledError(
            f"{name} weights not installed (expected {folder}); they are made by {REPRODUCE[name]}"
        )
    return folder


def preset_adapter_dir(name: str) -> Path:
    """`<preset>/adapter`; raises PresetNotInstalledError when its weights are missing."""
    folder = preset_folder(name) / "adapter"
    if not (folder / "adapter.safetensors").is_file():
        raise PresetNotInstalledError(
            f"{name} adapter weights not installed (expected {folder}); they are made by {REPRODUCE[name]}"
        )
    return folder


def resolve_base_source(source: str) -> str:
    """A base source with a preset name replaced by its folder ('tiny' and paths pass through)."""
    return str(preset_base_dir(source)) if is_preset(source) else source
