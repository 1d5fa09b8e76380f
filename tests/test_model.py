"""MDSD3Transformer against diffusers' SD3Transformer2DModel and against a direct computation of the mask."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel

from mdsd3_cli.model.heads import head_mask, partition_heads
from mdsd3_cli.model.transformer import MDSD3AttnProcessor, MDSD3Transformer, UnsupportedBaseError, context_scale
from mdsd3_cli.model.weights import TINY_TRANSFORMER

HEADS = TINY_TRANSFORMER["num_attention_heads"]


def _inputs(batch: int, seed: int = 0, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 16, size, size, generator=g)
    embeds = torch.randn(batch, 12, TINY_TRANSFORMER["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, TINY_TRANSFORMER["pooled_projection_dim"], generator=g)
    timestep = torch.full((batch,), 700.0)
    clean = torch.randn(batch, 16, size, size, generator=g)
    return latents, embeds, pooled, timestep, clean


def _randomise_z(model: MDSD3Transformer, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.clean_blocks:
            for z in (block.z_q, block.z_k, block.z_v):
                z.weight.copy_(torch.randn(z.weight.shape, generator=g) * 0.2)
                z.bias.copy_(torch.randn(z.bias.shape, generator=g) * 0.2)


def test_fresh_adapter_with_all_ones_mask_equals_sd3(fresh_base):
    reference = SD3Transformer2DModel(**TINY_TRANSFORMER)
    reference.load_state_dict(fresh_base.transformer.state_dict())
    model = MDSD3Transformer.from_base(fresh_base.transformer)
    latents, embeds, pooled, timestep, clean = _inputs(2)
    ones = torch.ones(2, HEADS)
    with torch.no_grad():
        expected = reference(latents, embeds, pooled, timestep).sample
        uncached = model(latents, embeds, pooled, timestep, head_mask=ones, clean_latents=clean).sample
        cached = model(
            latents, embeds, pooled, timestep, head_mask=ones, clean_injections=model.encode_clean(clean)
        ).sample
    torch.testing.assert_close(uncached, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=0)


def test_cached_equals_uncached_with_trained_z_layers(fresh_base):
    model = MDSD3Transformer.from_base(fresh_base.transformer)
    _randomise_z(model)
    latents, embeds, pooled, timestep, clean = _inputs(2, seed=1)
    mask = head_mask([[1.0, 0.5, 0.0], [0.2, 1.0, 0.7]], partition_heads(HEADS, 3))
    with torch.no_grad():
        uncached = model(latents, embeds, pooled, timestep, head_mask=mask, clean_latents=clean).sample
        cached = model(
            latents, embeds, pooled, timestep, head_mask=mask, clean_injections=model.encode_clean(clean)
        ).sample
        no_clean = model(latents, embeds, pooled, timestep, head_mask=mask).sample
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    assert (cached - no_clean).abs().max() > 1e-3, "non-zero Z layers must change the output"


def test_cache_is_broadcast_over_guidance_halves(fresh_base):
    """One cache entry per image serves both halves of a guided batch, exactly like a duplicated cache."""
    model = MDSD3Transformer.from_base(fresh_base.transformer)
    _randomise_z(model)
    latents, embeds, pooled, timestep, clean = _inputs(2, seed=2)
    cache = model.encode_clean(clean[:1])
    doubled = torch.cat([latents[:1], latents[:1]])
    with torch.no_grad():
        shared = model(doubled, embeds, pooled, timestep, clean_injections=cache).sample
        copied = model(doubled, embeds, pooled, timestep, clean_injections=torch.cat([cache, cache], dim=2)).sample
    torch.testing.assert_close(shared, copied, atol=0, rtol=0)


def test_encode_clean_shape_and_independence_from_timestep(fresh_base):
    model = MDSD3Transformer.from_base(fresh_base.transformer)
    cache = model.encode_clean(torch.randn(3, 16, 8, 8))
    assert cache.shape == (TINY_TRANSFORMER["num_layers"], 3, 3, 16, 48)
    assert all(p.requires_grad for p in model.clean_blocks.parameters())  # trainable by default


def _attention_inputs(batch=2, tokens=5, context=4, dim=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, dim, generator=g), torch.randn(batch, context, dim, generator=g)


def _direct_joint_attention(attn, x, e, mask):
    """Textbook computation: per head, context q/k/v scaled by the head's mask value."""
    heads, hd = attn.heads, x.shape[-1] // attn.heads
    q = torch.cat([attn.to_q(x), attn.add_q_proj(e)], 1)
    k = torch.cat([attn.to_k(x), attn.add_k_proj(e)], 1)
    v = torch.cat([attn.to_v(x), attn.add_v_proj(e)], 1)
    outs = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        scale = torch.ones(q.shape[:2] + (1,))
        scale[:, x.shape[1] :] = mask[:, h].view(-1, 1, 1)
        qh, kh, vh = q[..., sl] * scale, k[..., sl] * scale, v[..., sl] * scale
        weights = torch.softmax(qh @ kh.transpose(1, 2) / hd**0.5, dim=-1)
        outs.append(weights @ vh)
    out = torch.cat(outs, -1)
    return attn.to_out[0](out[:, : x.shape[1]]), attn.to_add_out(out[:, x.shape[1] :]), out


def test_mask_semantics_against_direct_computation(fresh_base):
    attn = fresh_base.transformer.transformer_blocks[0].attn
    x, e = _attention_inputs()
    mask = torch.tensor([[1.0, 1.0, 0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 0.25, 0.25]])
    with torch.no_grad():
        image_out, context_out = MDSD3AttnProcessor()(attn, x, e, context_scale=context_scale(mask, 8, x.dtype))
        expected_image, expected_context, _ = _direct_joint_attention(attn, x, e, mask)
    torch.testing.assert_close(image_out, expected_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(context_out, expected_context, atol=1e-5, rtol=1e-5)


def test_masked_heads_take_nothing_from_context_values(fresh_base):
    """With mask 0 a head's output does not change when the context changes; unmasked heads do change."""
    attn = fresh_base.transformer.transformer_blocks[0].attn
    x, e = _attention_inputs(batch=1)
    _, e2 = _attention_inputs(batch=1, seed=9)
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
    with torch.no_grad():
        _, _, heads_a = _direct_joint_attention(attn, x, e, mask)
        _, _, heads_b = _direct_joint_attention(attn, x, e2, mask)
        processor_a, _ = MDSD3AttnProcessor()(attn, x, e, context_scale=context_scale(mask, 8, x.dtype))
        processor_b, _ = MDSD3AttnProcessor()(attn, x, e2, context_scale=context_scale(mask, 8, x.dtype))
    image = slice(0, x.shape[1])
    torch.testing.assert_close(heads_a[:, image, :16], heads_b[:, image, :16])  # heads 0-1 (mask 0)
    assert (heads_a[:, image, 16:] - heads_b[:, image, 16:]).abs().max() > 1e-3
    # Through the processor: only the masked heads' contribution is context-independent, so outputs differ
    # exactly by the unmasked heads' change projected through to_out.
    delta_heads = heads_a[:, image] - heads_b[:, image]
    torch.testing.assert_close(processor_a - processor_b, delta_heads @ attn.to_out[0].weight.T, atol=1e-5, rtol=1e-4)


def test_half_ratio_scales_context_qkv_by_half(fresh_base):
    attn = fresh_base.transformer.transformer_blocks[0].attn
    x, e = _attention_inputs(batch=1)
    captured = {}
    original = torch.nn.functional.scaled_dot_product_attention

    def capture(q, k, v, *args, **kwargs):
        captured.update(q=q, k=k, v=v)
        return original(q, k, v, *args, **kwargs)

    half = torch.full((1, HEADS), 0.5)
    with torch.no_grad():
        torch.nn.functional.scaled_dot_product_attention = capture
        try:
            MDSD3AttnProcessor()(attn, x, e, context_scale=context_scale(half, 8, x.dtype))
            masked = dict(captured)
            MDSD3AttnProcessor()(attn, x, e, context_scale=context_scale(torch.ones(1, HEADS), 8, x.dtype))
            full = dict(captured)
        finally:
            torch.nn.functional.scaled_dot_product_attention = original
    tokens = x.shape[1]
    for name in "qkv":
        torch.testing.assert_close(masked[name][:, :, tokens:], 0.5 * full[name][:, :, tokens:])
        torch.testing.assert_close(masked[name][:, :, :tokens], full[name][:, :, :tokens])  # image tokens untouched


@pytest.mark.parametrize("classes", range(1, 8))
def test_partition_for_24_heads(classes):
    groups = partition_heads(24, classes)
    sizes = [len(g) for g in groups]
    assert sorted(sum(groups, [])) == list(range(24))
    assert set(sizes) <= {24 // classes, -(-24 // classes)}
    assert sizes == sorted(sizes, reverse=True)
    assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)


def test_sd35_style_base_is_refused():
    config = dict(TINY_TRANSFORMER, qk_norm="rms_norm")
    with pytest.raises(UnsupportedBaseError, match="q/k normalisation"):
        MDSD3Transformer(**config)


def test_block_loop_compiles_without_graph_breaks(fresh_base):
    model = MDSD3Transformer.from_base(fresh_base.transformer)
    latents, embeds, pooled, timestep, clean = _inputs(1)
    cache = model.encode_clean(clean)
    mask = torch.ones(2, HEADS)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model.forward)(
        torch.cat([latents, latents]),
        torch.cat([embeds, embeds]),
        torch.cat([pooled, pooled]),
        torch.cat([timestep, timestep]),
        head_mask=mask,
        clean_injections=cache,
        return_dict=False,
    )
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
