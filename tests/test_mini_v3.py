"""mini v3's model levers (docs/METHOD.md §7): the residual x-prediction recorded in the adapter config and
followed by the sampler and the training loss, and the zero-initialised residual output convolution. SD3
adapters keep the velocity parametrisation (tests/test_model.py and tests/test_sampler.py show that it equals
diffusers' SD3)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mdsd3_cli.model import presets
from mdsd3_cli.model.adapter import CONFIG_NAME, FlowStart, read_adapter_config
from mdsd3_cli.model.heads import all_prompts
from mdsd3_cli.model.presets.build_mini import MINI_CLASSES, fresh_mini, save_preset
from mdsd3_cli.model.prompts import load_prompt_embeddings
from mdsd3_cli.model.sampler import MDSD3Sampler, SampleRequest
from mdsd3_cli.model.transformer import residual_velocity, residual_x0
from mdsd3_cli.model.weights import build_model, describe_parameters, load_base
from mdsd3_cli.train.step import FlowSchedule, flow_matching_loss, step_generator

START = FlowStart(alpha=0.3, beta=1.0)
ROOT = Path(__file__).resolve().parents[1]


def _residual_mini(seed: int = 5, conv_bias: float = 0.0, gated: bool = False):
    """A fresh mini with the output convolution and a zero output layer (Δ̂ = the conv's bias everywhere, and so
    is the gate g with `gated`); the clean branch injects (non-zero Z layers), so the body is not a no-op."""
    base, model, words = fresh_mini(seed, gated=gated)
    model.enable_output_conv()
    with torch.no_grad():
        model.proj_out.weight.zero_()
        model.proj_out.bias.zero_()
        model.output_conv.bias.fill_(conv_bias)
        for block in model.clean_blocks:
            block.z_v.weight.normal_(0, 0.05)
    return base, model.eval(), words


@pytest.fixture(scope="module")
def residual_preset(tmp_path_factory):
    root = tmp_path_factory.mktemp("presets")
    _, model, words = _residual_mini(gated=True)
    save_preset(model, words, root / "mini", training={"steps": 0}, start=START, prediction="residual_x0")
    return root, model


def _sampler(root, monkeypatch, tmp_path, grid_shifts: int = 1) -> MDSD3Sampler:
    monkeypatch.setattr(presets, "PRESETS_ROOT", root)
    base = load_base("mini")
    model, config = build_model(base, presets.preset_adapter_dir("mini"))
    embeddings = load_prompt_embeddings("mini", base.fingerprint, all_prompts(MINI_CLASSES), tmp_path)
    return MDSD3Sampler(base, model.eval(), config, embeddings, grid_shifts=grid_shifts)


def test_the_adapter_config_records_the_residual_prediction_and_the_output_conv(residual_preset, monkeypatch, tmp_path):
    root, model = residual_preset
    config = read_adapter_config(root / "mini" / "adapter")
    assert config.prediction == "residual_x0" and config.output_conv and config.start == START
    sampler = _sampler(root, monkeypatch, tmp_path)
    assert sampler.model.output_conv is not None
    assert torch.equal(sampler.model.output_conv.weight, model.output_conv.weight.half().float())
    assert describe_parameters(sampler.model)["output_conv"] == 96 * 96 * 9 + 96  # (Δ̂, g): 2 × 48 channels


def test_an_adapter_config_without_the_fields_is_a_velocity_model(residual_preset, tmp_path):
    data = json.loads((residual_preset[0] / "mini" / "adapter" / CONFIG_NAME).read_text())
    del data["prediction"], data["output_conv"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    config = read_adapter_config(tmp_path)
    assert config.prediction == "velocity" and not config.output_conv


@pytest.mark.parametrize("grid_shifts", (1, 2))
def test_zero_residual_reproduces_the_photo_exactly(residual_preset, monkeypatch, tmp_path, grid_shifts):
    """Δ̂ = 0 and g = 0: x̂0 is the clean latent at every step and the last step returns it, whatever the start
    noise."""
    sampler = _sampler(residual_preset[0], monkeypatch, tmp_path, grid_shifts)
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    requests = [SampleRequest({}, 0, START.alpha, START.beta), SampleRequest({"rain": 1.0}, 1, 1.0, 0.0)]
    out = sampler.generate(pixels, requests, steps=3, guidance=1.0)
    assert np.array_equal(out, pixels.numpy())


def test_the_last_step_returns_x0_hat(monkeypatch, tmp_path):
    """Δ̂ = c everywhere (the output convolution's bias): the sampled latent is z_clean + c, to float rounding."""
    root = tmp_path / "presets"
    _, model, words = _residual_mini(conv_bias=0.125)
    save_preset(model, words, root / "mini", start=START, prediction="residual_x0")
    sampler = _sampler(root, monkeypatch, tmp_path)
    pixels = torch.randint(0, 256, (1, 32, 32, 3), dtype=torch.uint8)
    latents = sampler.generate(
        pixels, [SampleRequest({"haze": 0.5}, 3, START.alpha, START.beta)], steps=4, guidance=2.0, output="latent"
    )
    assert torch.allclose(latents, sampler.encode(pixels) + 0.125, atol=1e-6)


def test_residual_helpers():
    clean, delta = torch.randn(2, 4, 3, 3), torch.randn(4, 4, 3, 3)  # two guidance halves share the clean latents
    noisy = torch.randn(4, 4, 3, 3)
    x0 = residual_x0(delta, clean, noisy)
    assert torch.equal(x0[:2], clean + delta[:2]) and torch.equal(x0[2:], clean + delta[2:])
    gate = torch.rand(4, 4, 3, 3)  # the gated skip: twice the channels, (Δ̂, g)
    gated = residual_x0(torch.cat([delta, gate], dim=1), clean, noisy)
    assert torch.allclose(gated, torch.cat([clean, clean]) + delta + gate * (noisy - torch.cat([clean, clean])))
    with pytest.raises(ValueError, match="channels"):
        residual_x0(torch.randn(4, 6, 3, 3), clean, noisy)
    noise, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    sigma = torch.tensor([0.5, 0.01])
    noisy = (1 - sigma.view(-1, 1, 1, 1)) * target + sigma.view(-1, 1, 1, 1) * noise
    velocity = residual_velocity(target, noisy, sigma)
    assert torch.allclose(velocity[0], noise[0] - target[0], atol=1e-5)  # the flow's velocity
    assert torch.allclose(velocity[1], (noisy[1] - target[1]) / 0.05)  # σ clamped near 0


def test_output_conv_starts_at_zero_and_changes_nothing():
    _, model, _ = fresh_mini(2)
    latents, clean = torch.randn(1, 48, 8, 8), torch.randn(1, 48, 8, 8)
    kwargs = dict(
        encoder_hidden_states=torch.randn(1, 4, 64),
        pooled_projections=torch.randn(1, 64),
        timestep=torch.tensor([500.0]),
        clean_latents=clean,
        return_dict=False,
    )
    with torch.no_grad():
        before = model(hidden_states=latents, **kwargs)[0]
        model.enable_output_conv()
        assert "output_conv" in model.adapter_modules()
        after = model(hidden_states=latents, **kwargs)[0]
    assert torch.equal(before, after)


def test_residual_loss_is_zero_for_an_exact_x0_and_rejects_unknown_predictions():
    """Identity pairs (degraded = clean) with Δ̂ = 0: x̂0 = x0 at every σ, loss exactly 0; a velocity model's
    zero output is not."""
    base, model, _ = _residual_mini()
    clean = torch.randn(2, 48, 4, 4)
    args = (
        model,
        clean,
        clean.clone(),
        torch.randn(2, 4, 64),
        torch.randn(2, 64),
        torch.ones(2, 8),
        step_generator(0, 1, 0),
        FlowSchedule.from_base(base),
    )
    with torch.no_grad():
        assert float(flow_matching_loss(*args, start=START, prediction="residual_x0")) == 0.0
        assert float(flow_matching_loss(*args, start=START)) > 0.0
        with pytest.raises(ValueError, match="unknown prediction"):
            flow_matching_loss(*args, prediction="epsilon")


def test_given_noise_is_the_flow_start():
    """`noise=` replaces the drawn ε (mini's coupled degradations): the loss depends on it, and equals the drawn
    ε's loss when it is that ε."""
    base, model, _ = _residual_mini()
    with torch.no_grad():
        model.proj_out.weight.normal_(0, 0.02)
    clean = torch.randn(2, 48, 4, 4)
    target = clean + 0.1 * torch.randn_like(clean)
    args = (model, clean, target, torch.randn(2, 4, 64), torch.randn(2, 64), torch.ones(2, 8))
    schedule = FlowSchedule.from_base(base)
    generator = step_generator(0, 2, 0)
    schedule.draw(2, generator, 0.0, 1.0)
    drawn = torch.randn(target.shape, generator=generator)
    with torch.no_grad():
        reference = flow_matching_loss(*args, step_generator(0, 2, 0), schedule, start=START, prediction="residual_x0")
        same = flow_matching_loss(
            *args, step_generator(0, 2, 0), schedule, start=START, prediction="residual_x0", noise=drawn
        )
        other = flow_matching_loss(
            *args,
            step_generator(0, 2, 0),
            schedule,
            start=START,
            prediction="residual_x0",
            noise=torch.randn(target.shape),
        )
    assert torch.equal(reference, same) and not torch.equal(reference, other)


def _train_mini_module():
    spec = importlib.util.spec_from_file_location("train_mini", ROOT / "scripts" / "train_mini.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_class_weights_set_the_class_mix_of_the_training_batches():
    """`--class-weight rain=3` (mini v4's fine-tuning): rain is drawn in about half the samples instead of a
    quarter; without weights every class is equally likely; a bad weight names the flag and the class."""
    train_mini = _train_mini_module()
    crops = torch.randint(0, 256, (4, 24, 24, 3), dtype=torch.uint8)

    def rain_share(weights) -> float:
        batches = train_mini.Batches(crops, 16, 64, 0, torch.device("cpu"), weights)
        ratios = torch.cat([batches(step)[2] for step in range(4)])
        return float((ratios.argmax(1) == MINI_CLASSES.index("rain"))[ratios.sum(1) > 0].float().mean())

    assert 0.4 < rain_share(train_mini.parse_class_weights("rain=3")) < 0.6
    assert 0.15 < rain_share(None) < 0.35
    for bad in ("snow=2", "rain=0", "rain"):
        with pytest.raises(argparse.ArgumentTypeError, match="--class-weight"):
            train_mini.parse_class_weights(bad)
