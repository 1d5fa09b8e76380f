"""Small generate outputs for the dataset-format tests (session fixtures): the tiny preset at 32 px, 2 steps, in
process."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import generate, generate_recipe, write_photos


@pytest.fixture(scope="session")
def tiny_photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("format_photos"))


@pytest.fixture(scope="session")
def folders_dataset(tmp_path_factory, tiny_photos) -> Path:
    """A finished folders-layout dataset: 3 keys x 3 variant folders. Treat as read-only (copy to modify)."""
    root = tmp_path_factory.mktemp("folders_dataset")
    generate(generate_recipe(root / "recipe.yaml", tiny_photos, root / "out"))
    return root / "out"
