"""`mdsd3 init --preset mini` writes a recipe that runs mini as configs/demo.yaml does, and `check` warns when a mini
recipe's steps, guidance or size leave what mini was trained for."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from mdsd3_cli.pipeline.synthesizer import PRESET_SETTINGS
from mdsd3_cli.recipe.generate import load_recipe

from .helpers import EXAMPLE_PHOTOS, REPO, mdsd3

DEMO = REPO / "configs" / "demo.yaml"


def warnings_of(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


@pytest.fixture
def mini_recipe(tmp_path) -> Path:
    path = tmp_path / "mini.yaml"
    written = mdsd3("init", path, "--preset", "mini")
    assert written.exit_code == 0, written.output
    (tmp_path / "photos").mkdir()
    shutil.copy(EXAMPLE_PHOTOS / "chelsea.jpg", tmp_path / "photos")
    return path


def test_init_preset_mini_runs_mini_as_the_demo_does(mini_recipe):
    recipe, demo = load_recipe(mini_recipe), load_recipe(DEMO)
    assert recipe.model.base == demo.model.base == "mini" and recipe.model.adapter == demo.model.adapter == "mini"
    assert (recipe.input.size, recipe.input.resize) == (demo.input.size, demo.input.resize)
    assert recipe.sampling.model_dump(exclude={"seed"}) == demo.sampling.model_dump(exclude={"seed"})
    assert [v.model_dump() for v in recipe.variants] == [v.model_dump() for v in demo.variants]
    assert "mdsd3 check --config mini.yaml" in mini_recipe.read_text()
    api = PRESET_SETTINGS["mini"]  # Synthesizer.from_preset("mini") samples with the same settings
    assert api["input"]["size"] == demo.input.size
    assert api["sampling"] == demo.sampling.model_dump(include=set(api["sampling"]))
    checked = mdsd3("check", "--config", mini_recipe)
    assert checked.exit_code == 0, checked.output
    assert warnings_of(checked) == []


@pytest.mark.parametrize(
    "override, field, trained",
    [
        ("sampling.steps=20", "sampling.steps 20", "trained for 4 steps"),
        ("sampling.guidance=3", "sampling.guidance 3", "trained for guidance 0-1"),
        ("input.size=320", "input.size 320", "trained on 64-256-pixel crops"),
        ("input.size=32", "input.size 32", "trained on 64-256-pixel crops"),
        ("sampling.class_guidance.rain=3", "sampling.class_guidance.rain 3", "measured with rain guidance 1-2.5"),
        ("sampling.class_guidance.haze=2", "sampling.class_guidance.haze 2", "measured with haze guidance 1"),
    ],
)
def test_check_warns_when_a_mini_recipe_leaves_what_mini_was_trained_for(mini_recipe, override, field, trained):
    checked = mdsd3("check", "--config", mini_recipe, "--set", override)
    assert checked.exit_code == 0, checked.output
    (warning,) = warnings_of(checked)
    assert field in warning and trained in warning and "model.adapter mini" in warning


def test_check_gives_no_mini_warning_for_other_models(tmp_path):
    data = yaml.safe_load(DEMO.read_text())
    data["model"] = {"base": "tiny", "classes": ["rain", "haze", "noise", "low_light"]}
    data["input"]["paths"] = [str(EXAMPLE_PHOTOS)]
    data["output"]["dir"] = str(tmp_path / "out")
    data["sampling"].update(steps=20, guidance=3.0, alpha=1.0, beta=0.0)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    checked = mdsd3("check", "--config", path, "--set", "input.size=256")
    assert checked.exit_code == 0, checked.output
    assert warnings_of(checked) == []


def test_init_with_an_unknown_preset_writes_nothing(tmp_path):
    path = tmp_path / "r.yaml"
    result = mdsd3("init", path, "--preset", "tiny")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "unknown preset 'tiny'" in result.stderr and not path.exists()


def test_generate_warns_as_check_does(mini_recipe):
    dry = mdsd3("generate", "--config", mini_recipe, "--dry-run", "--set", "sampling.guidance=2")
    assert dry.exit_code == 0, dry.output
    (warning,) = warnings_of(dry)
    assert "sampling.guidance 2" in warning and "trained for guidance 0-1" in warning
