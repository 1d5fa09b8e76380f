"""The mini preset's parts: the lossless pixel codec, the word text encoder, and a preset folder written by
`save_preset` loaded by name through the same loaders as a user's folders (random weights: no quality here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mdsd3_cli.model import presets
from mdsd3_cli.model.codec import PixelUnshuffleCodec
from mdsd3_cli.model.heads import all_prompts
from mdsd3_cli.model.presets.build_mini import MINI_CLASSES, MINI_CODEC, fresh_mini, save_preset
from mdsd3_cli.model.prompts import load_prompt_embeddings
from mdsd3_cli.model.sampler import MDSD3Sampler, SampleRequest
from mdsd3_cli.model.weights import build_model, load_base
from mdsd3_cli.recipe.generate import RecipeError, load_recipe

from .helpers import generate_recipe


def test_codec_round_trip_is_exact():
    codec = PixelUnshuffleCodec(**MINI_CODEC)
    pixels = torch.randint(0, 256, (2, 3, 32, 24)).float() / 127.5 - 1
    latents = codec.encode(pixels).latent_dist.mode()
    assert latents.shape == (2, 48, 8, 6)
    assert torch.equal(codec.decode(latents).sample, pixels)


@pytest.fixture(scope="module")
def preset_root(tmp_path_factory):
    """A mini preset with random weights (non-zero Z layers) written where the package looks for presets."""
    root = tmp_path_factory.mktemp("presets")
    _, model, words = fresh_mini(seed=3)
    with torch.no_grad():
        for block in model.clean_blocks:
            block.z_v.weight.normal_(0, 0.02)
    fingerprints = save_preset(model, words, root / "mini", training={"steps": 0})
    return root, model, fingerprints


@pytest.fixture()
def installed(preset_root, monkeypatch):
    root, model, fingerprints = preset_root
    monkeypatch.setattr(presets, "PRESETS_ROOT", root)
    return model, fingerprints


def test_preset_loads_by_name_with_its_fingerprints(installed, tmp_path):
    model, fingerprints = installed
    base = load_base("mini")
    assert isinstance(base.vae, PixelUnshuffleCodec)
    assert base.fingerprint == fingerprints["base"]
    loaded, config = build_model(base, presets.preset_adapter_dir("mini"))
    assert config.classes == MINI_CLASSES and config.training["steps"] == 0
    for name, tensor in model.state_dict().items():  # stored in fp16
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.float16).float()), name

    embeddings = load_prompt_embeddings("mini", base.fingerprint, all_prompts(MINI_CLASSES), tmp_path)
    pair, rain, haze = embeddings["rain haze"], embeddings["rain"], embeddings["haze"]
    assert torch.equal(pair.embeds[0], rain.embeds[0]) and torch.equal(pair.embeds[1], haze.embeds[0])
    assert not pair.embeds[2:].any() and not embeddings[""].embeds.any()
    assert torch.equal(pair.pooled, rain.pooled) and torch.equal(pair.pooled, embeddings["clean"].pooled)
    assert pair.pooled.any() and not embeddings[""].pooled.any()  # conditional vs unconditional

    sampler = MDSD3Sampler(base, loaded.eval(), config, embeddings)
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    out = sampler.generate(pixels, [SampleRequest({"rain": 1.0}, 0), SampleRequest({}, 1)], steps=1, guidance=1.0)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8


def _recipe(tmp_path, photos_dir):
    model, variants = "model={base: mini, adapter: mini}", "variants=[{name: rain, classes: {rain: 1.0}}]"
    return generate_recipe(tmp_path / "recipe.yaml", photos_dir, tmp_path / "out", model, variants)


def test_recipe_names_the_preset(installed, tmp_path):
    recipe = load_recipe(_recipe(tmp_path, tmp_path))
    assert recipe.classes() == MINI_CLASSES
    assert recipe.base_dir() == presets.PRESETS_ROOT / "mini" / "base"
    assert json.loads((presets.PRESETS_ROOT / "mini" / "fingerprints.json").read_text()) == installed[1]


def test_missing_preset_weights_are_a_clear_recipe_error(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "PRESETS_ROOT", tmp_path / "empty")
    with pytest.raises(RecipeError) as error:
        load_recipe(_recipe(tmp_path, tmp_path))
    text = str(error.value)
    assert "model.base" in text and "model.adapter" in text and "mini weights not installed" in text
