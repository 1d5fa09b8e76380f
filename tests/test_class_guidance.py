"""`sampling.class_guidance` (docs/METHOD.md §6): a class's own contribution scaled per sample, checked in the
recipe, recorded in the manifest and the run's identity, and stronger rain from mini where it is set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from mdsd3_cli import Synthesizer
from mdsd3_cli.evaluate import measure_pair
from mdsd3_cli.model.sampler import SampleRequest, guided
from mdsd3_cli.pipeline.requests import sample_request
from mdsd3_cli.recipe.generate import load_recipe

from .helpers import assert_clean_error, generate, generate_recipe, mdsd3, write_photos, write_recipe


def test_guided_adds_each_class_contrast_to_the_guided_prediction() -> None:
    branches = torch.tensor([1.0, 3.0, 2.0, 5.0])  # [uncond; cond; cond without k1; cond without k2], one value each

    def prediction(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        assert latents.shape[0] == 4  # every branch in one batch
        return branches.view(4, 1) * torch.ones_like(latents)

    latent, step = torch.zeros(1, 1), torch.tensor(1.0)
    combined = guided(prediction, 2.0, [1.5, 3.0])(latent, step)
    uncond, cond, without_1, without_2 = branches.tolist()
    expected = uncond + 2.0 * (cond - uncond) + 0.5 * (cond - without_1) + 2.0 * (cond - without_2)
    assert combined.item() == pytest.approx(expected)
    unguided = guided(lambda x, t: branches[1:].view(3, 1) * torch.ones_like(x), 1.0, [1.5, 3.0])
    assert unguided(latent, step).item() == pytest.approx(cond + 0.5 * (cond - without_1) + 2.0 * (cond - without_2))


def test_a_sample_is_guided_for_the_classes_it_draws(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    path = write_recipe(tmp_path / "r.yaml", "sampling.class_guidance={rain: 2.0, noise: 1.0}")
    recipe = load_recipe(path)
    classes = recipe.classes()
    rain, mix = recipe.variants  # rain: 1.0; mix: haze [0.2, 0.8], noise 0.5
    assert sample_request(recipe, "k", rain, 1, classes).class_guidance == {"rain": 2.0}
    assert sample_request(recipe, "k", mix, 1, classes).class_guidance == {}  # no rain drawn; noise at 1 is no change
    assert recipe.identity()["sampling"]["class_guidance"] == {"rain": 2.0}
    plain = load_recipe(write_recipe(tmp_path / "plain.yaml"))
    assert "class_guidance" not in plain.identity()["sampling"]  # runs without it keep their identity


@pytest.mark.parametrize(
    "override, field, message",
    [
        ("sampling.class_guidance={rian: 2}", "sampling.class_guidance.rian", "did you mean 'rain'"),
        ("sampling.class_guidance={rain: -1}", "sampling.class_guidance.rain", "greater than or equal to 0"),
        ("sampling.class_guidance={rain: fast}", "sampling.class_guidance.rain", "number"),
    ],
)
def test_bad_class_guidance_is_an_error_naming_the_field(tmp_path: Path, override, field, message) -> None:
    (tmp_path / "photos").mkdir()
    path = write_recipe(tmp_path / "r.yaml", override)
    assert_clean_error(mdsd3("check", "--config", path), field, message)


def test_guided_and_unguided_samples_in_one_batch_get_their_own_bytes() -> None:
    synth = Synthesizer.from_preset("tiny", overrides=["input.size=32", "sampling.steps=2"])
    photo = data.astronaut()
    pixels = [synth._fit("astronaut", photo)] * 3
    rain = SampleRequest({"rain": 1.0, "haze": 0.0, "noise": 0.0}, 7, 1.0, 0.0, {"rain": 2.0})
    haze = SampleRequest({"rain": 0.0, "haze": 1.0, "noise": 0.0}, 8, 1.0, 0.0)
    both = SampleRequest({"rain": 1.0, "haze": 0.5, "noise": 0.0}, 9, 1.0, 0.0, {"rain": 2.0})
    together = synth.pipeline.sample(pixels, [rain, haze, both], steps=2, guidance=1.0)
    alone = [synth.pipeline.sample(pixels[:1], [request], 2, 1.0)[0] for request in (rain, haze, both)]
    for batched, single in zip(together, alone):
        np.testing.assert_array_equal(batched, single)
    unguided = synth.pipeline.sample(pixels[:1], [SampleRequest(rain.ratios, 7, 1.0, 0.0)], 2, 1.0)[0]
    assert not np.array_equal(alone[0], unguided)  # the guidance changed the rain sample


def test_generate_records_class_guidance_and_refuses_to_resume_with_another(tmp_path: Path) -> None:
    photos = write_photos(tmp_path / "photos", {"astronaut": "astronaut.png"})
    recipe = generate_recipe(tmp_path / "r.yaml", photos, tmp_path / "out", "sampling.class_guidance={rain: 2.0}")
    generate(recipe)
    lines = [json.loads(line) for line in (tmp_path / "out" / "manifest").glob("*.jsonl").__next__().open()]
    guidance = {line["folder"]: line.get("class_guidance") for line in lines}
    assert guidance == {"rain": {"rain": 2.0}, "mix_r1": None, "mix_r2": None}
    again = mdsd3("generate", "--config", recipe, "--set", "sampling.class_guidance={rain: 3.0}")
    assert again.exit_code == 2 and "class_guidance" in again.stderr, again.output


def test_mini_rain_guidance_strengthens_rain_and_leaves_other_classes_alone() -> None:
    synth = Synthesizer.from_preset("mini")  # configs/demo.yaml's settings, rain's class guidance included
    guidance = synth.recipe.sampling.class_guidance["rain"]
    assert guidance > 1
    assert synth.request(synth.full_ratios({"haze": 1.0}), 5, 0.3, 1.0).class_guidance == {}
    photo = synth._fit("chelsea", data.chelsea())
    ratios = synth.full_ratios({"rain": 1.0})
    plain, guided = synth.pipeline.sample(
        [photo, photo],
        [SampleRequest(ratios, 5, 0.3, 1.0), synth.request(ratios, 5, 0.3, 1.0)],
        synth.recipe.sampling.steps,
        synth.recipe.sampling.guidance,
    )
    assert measure_pair(photo, guided)["rain"] > 1.5 * measure_pair(photo, plain)["rain"]
