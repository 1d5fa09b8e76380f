"""Small generate outputs for the dataset-format tests: the tiny preset at 32 px, 2 steps, in process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image
from skimage import data

from mdsd3_cli.generate.plan import ShardSpec
from mdsd3_cli.generate.run import plan_run, run_generate
from mdsd3_cli.recipe.generate import load_recipe

PHOTOS = {"astronaut": "astronaut.png", "coffee": "coffee.png", "chelsea": "sub/chelsea.v2 x.png"}
"""skimage image -> file under the input folder (a sub folder, a dot and a space exercise the key rules)."""
FOLDERS = ["rain", "mix_r1", "mix_r2"]


def write_photos(folder: Path) -> Path:
    for name, relative in PHOTOS.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(data, name)()).save(path)
    return folder


def write_recipe(path: Path, inputs: Path, out: Path, **output: object) -> Path:
    recipe = {
        "model": {"base": "tiny", "classes": ["rain", "haze", "noise"]},
        "input": {"paths": [str(inputs)], "size": 32},
        "output": {"dir": str(out), **output},
        "sampling": {"steps": 2, "guidance": 2.0, "seed": 3, "batch_size": 4},
        "variants": [
            {"name": "rain", "classes": {"rain": 1.0}},
            {"name": "mix", "classes": {"haze": [0.2, 0.8], "noise": 0.5}, "repeats": 2},
        ],
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def generate(recipe_path: Path, shard: ShardSpec = ShardSpec(0, 1)) -> None:
    summary = run_generate(plan_run(load_recipe(recipe_path), shard))
    assert summary.exit_code == 0, summary


@pytest.fixture(scope="session")
def tiny_photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("format_photos"))


@pytest.fixture(scope="session")
def folders_dataset(tmp_path_factory, tiny_photos) -> Path:
    """A finished folders-layout dataset: 3 keys x 3 variant folders. Treat as read-only (copy to modify)."""
    root = tmp_path_factory.mktemp("folders_dataset")
    generate(write_recipe(root / "recipe.yaml", tiny_photos, root / "out"))
    return root / "out"


def copy_dataset(dataset: Path, destination: Path) -> Path:
    shutil.copytree(dataset, destination)
    return destination
