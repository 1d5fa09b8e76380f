"""The sampler against diffusers' StableDiffusion3Pipeline, and per-sample determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from skimage import data

from mdsd3_cli.model.grid_shifts import grid_offsets
from mdsd3_cli.model.sampler import Conditioning, MDSD3Sampler, SampleRequest, seeded_noise
from mdsd3_cli.model.weights import TINY_TRANSFORMER, build_model, fresh_adapter_config

from .helpers import CLASSES


def _sampler(base, prompts, z_scale: float = 0.0) -> MDSD3Sampler:
    model, config = build_model(base, config=fresh_adapter_config(base, CLASSES))
    if z_scale:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for block in model.clean_blocks:
                for z in (block.z_q, block.z_k, block.z_v):
                    z.weight.copy_(torch.randn(z.weight.shape, generator=g) * z_scale)
    return MDSD3Sampler(base, model, config, prompts)


def _pipeline(base) -> StableDiffusion3Pipeline:
    """diffusers' own pipeline on a stock copy of the base (MDSD3Transformer.from_base takes over the base's
    attention modules and installs its processor on them)."""
    transformer = SD3Transformer2DModel(**TINY_TRANSFORMER)
    transformer.load_state_dict(base.transformer.state_dict())
    assert type(transformer.transformer_blocks[0].attn.processor).__name__ == "JointAttnProcessor2_0"
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=base.make_scheduler(),
        vae=base.vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def _photos(n: int, size: int = 32) -> torch.Tensor:
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    return torch.stack([torch.from_numpy(np.ascontiguousarray(p[:size, :size])) for p in photos[:n]])


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampler_equals_sd3_pipeline(fresh_base, tiny_prompts, guidance):
    """Fresh adapter, all-ones masks, α=1, β=0: the same latents as diffusers' pipeline."""
    sampler = _sampler(fresh_base, tiny_prompts)
    clean = sampler.encode(_photos(2))
    latents = seeded_noise([11, 12], clean.shape[1:])
    text, empty = tiny_prompts["rain haze"], tiny_prompts[""]
    ones = torch.ones(2, fresh_base.shape["num_attention_heads"])
    cond = sampler.conditioning(["rain haze"] * 2, ones)
    uncond = sampler.conditioning([""] * 2, ones)
    ours = sampler.denoise(latents, [sampler.model.encode_clean(clean)], cond, uncond, steps=3, guidance=guidance)
    theirs = _pipeline(fresh_base)(
        prompt_embeds=text.embeds[None].repeat(2, 1, 1),
        pooled_prompt_embeds=text.pooled[None].repeat(2, 1),
        negative_prompt_embeds=empty.embeds[None].repeat(2, 1, 1),
        negative_pooled_prompt_embeds=empty.pooled[None].repeat(2, 1),
        latents=latents,
        num_inference_steps=3,
        guidance_scale=guidance,
        height=32,
        width=32,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_guidance_one_runs_a_single_branch(fresh_base, tiny_prompts):
    sampler = _sampler(fresh_base, tiny_prompts)
    batches = []
    original = sampler.model.forward

    def spy(*args, **kwargs):
        batches.append(kwargs["hidden_states"].shape[0])
        return original(*args, **kwargs)

    sampler.model.forward = spy
    requests = [SampleRequest({"rain": 1.0}, seed=1)]
    sampler.generate(_photos(1), requests, steps=2, guidance=1.0, output="latent")
    sampler.generate(_photos(1), requests, steps=2, guidance=3.0, output="latent")
    assert batches == [1, 1, 2, 2]


def test_sample_is_independent_of_batch(fresh_base, tiny_prompts):
    """With the transformer batch held constant (pad_to), a sample's bytes do not depend on its batch mates,
    their number or their order."""
    sampler = _sampler(fresh_base, tiny_prompts, z_scale=0.3)
    requests = [
        SampleRequest({"rain": 1.0, "haze": 0.5}, seed=7, alpha=0.9, beta=0.4),
        SampleRequest({}, seed=8),
        SampleRequest({"noise": 1.0}, seed=9, alpha=1.2, beta=0.1),
        SampleRequest({"haze": 0.3}, seed=10),
    ]
    photos = _photos(4)
    batch = sampler.generate(photos, requests, steps=3, guidance=3.0, pad_to=4)
    alone = sampler.generate(photos[:1], requests[:1], steps=3, guidance=3.0, pad_to=4)
    last = sampler.generate(photos[3:], requests[3:], steps=3, guidance=3.0, pad_to=4)
    reordered = sampler.generate(photos[[2, 0]], [requests[2], requests[0]], steps=3, guidance=3.0, pad_to=4)
    assert batch.dtype == np.uint8 and batch.shape == (4, 32, 32, 3) and alone.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(batch[0], alone[0])
    np.testing.assert_array_equal(batch[3], last[0])
    np.testing.assert_array_equal(reordered[1], batch[0])
    np.testing.assert_array_equal(reordered[0], batch[2])
    latents = sampler.generate(photos, requests, steps=3, guidance=3.0, output="latent", pad_to=4)
    alone_latent = sampler.generate(photos[1:2], requests[1:2], steps=3, guidance=3.0, output="latent", pad_to=4)
    assert torch.equal(latents[1], alone_latent[0])


def test_alpha_beta_and_ratios_change_the_output(fresh_base, tiny_prompts):
    sampler = _sampler(fresh_base, tiny_prompts, z_scale=0.3)
    photo = _photos(1)
    base = sampler.generate(photo, [SampleRequest({"rain": 1.0}, seed=3)], steps=2, guidance=2.0, output="latent")
    for changed in (
        SampleRequest({"rain": 1.0}, seed=3, beta=0.5),
        SampleRequest({"rain": 0.5}, seed=3),
        SampleRequest({"rain": 1.0}, seed=4),
    ):
        other = sampler.generate(photo, [changed], steps=2, guidance=2.0, output="latent")
        assert (other - base).abs().max() > 1e-4


def test_unknown_class_is_a_clear_error(fresh_base, tiny_prompts):
    sampler = _sampler(fresh_base, tiny_prompts)
    with pytest.raises(ValueError, match="unknown degradation class 'snow'"):
        sampler.generate(_photos(1), [SampleRequest({"snow": 1.0}, seed=1)], steps=1, guidance=1.0)


def test_missing_prompt_embedding_names_the_prompt(fresh_base, tiny_prompts):
    sampler = _sampler(fresh_base, {k: v for k, v in tiny_prompts.items() if k != "haze"})
    with pytest.raises(KeyError, match="'haze'.*encode-prompts"):
        sampler.generate(_photos(1), [SampleRequest({"haze": 1.0}, seed=1)], steps=1, guidance=1.0)


def test_conditioning_has_zero_mask_for_unconditional_branch(fresh_base, tiny_prompts):
    sampler = _sampler(fresh_base, tiny_prompts)
    cond, uncond = sampler.request_conditioning([SampleRequest({"rain": 1.0, "noise": 0.5}, seed=0)])
    assert isinstance(cond, Conditioning)
    assert cond.head_mask.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.5, 0.5]]
    assert uncond.head_mask.abs().sum() == 0
    torch.testing.assert_close(cond.embeds[0], tiny_prompts["rain noise"].embeds)
    torch.testing.assert_close(uncond.embeds[0], tiny_prompts[""].embeds)


def test_grid_offsets():
    assert grid_offsets(1, 2) == [(0, 0)]
    assert grid_offsets(2, 2) == [(0, 0), (1, 1)]
    assert grid_offsets(4, 4) == [(0, 0), (0, 2), (2, 0), (2, 2)]
    with pytest.raises(ValueError, match="one of"):
        grid_offsets(3, 2)
    with pytest.raises(ValueError, match="patch size is 1"):
        grid_offsets(2, 1)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_grid_shifts_average_the_velocity_of_the_rolled_latents(fresh_base, tiny_prompts, guidance):
    """One Euler step by hand: the velocity of the latents and of the latents rolled by half a token (with the
    clean branch of the rolled clean latents), rolled back and averaged."""
    shifted = _sampler(fresh_base, tiny_prompts, z_scale=0.05)
    plain = MDSD3Sampler(fresh_base, shifted.model, shifted.adapter, tiny_prompts)
    shifted = MDSD3Sampler(fresh_base, shifted.model, shifted.adapter, tiny_prompts, grid_shifts=2)
    request = SampleRequest({"rain": 1.0}, seed=3, alpha=0.5, beta=1.0)
    pixels = _photos(1)
    clean = plain.encode(pixels)
    latents = 0.5 * seeded_noise([3], clean.shape[1:]) + clean
    cond, uncond = plain.request_conditioning([request], unconditional=guidance > 1)
    half = fresh_base.shape["patch_size"] // 2

    def velocity(rolled: torch.Tensor, clean_rolled: torch.Tensor) -> torch.Tensor:
        branches = [uncond, cond] if guidance > 1 else [cond]
        v = [
            plain.model(
                hidden_states=rolled,
                encoder_hidden_states=b.embeds,
                pooled_projections=b.pooled,
                timestep=torch.tensor([1000.0]),
                head_mask=b.head_mask,
                clean_injections=plain.model.encode_clean(clean_rolled),
                return_dict=False,
            )[0]
            for b in branches
        ]
        return v[0] + guidance * (v[1] - v[0]) if guidance > 1 else v[0]

    with torch.no_grad():
        back = torch.roll(
            velocity(torch.roll(latents, (half, half), (2, 3)), torch.roll(clean, (half, half), (2, 3))),
            (-half, -half),
            (2, 3),
        )
        expected = latents - (velocity(latents, clean) + back) / 2  # σ 1 -> 0 in one step
    ours = shifted.generate(pixels, [request], steps=1, guidance=guidance, output="latent")
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, plain.generate(pixels, [request], steps=1, guidance=guidance, output="latent"))
