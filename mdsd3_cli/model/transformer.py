"""MDSD3Transformer: SD3's MMDiT plus a per-head context mask and a clean-image branch (docs/METHOD.md §1-2).

Everything that differs from diffusers' `SD3Transformer2DModel` lives in this file:

* `MDSD3AttnProcessor` – the joint attention of every block, with two additions: the context tokens'
  q/k/v are scaled per sample and per head by the head mask [B, H] (passed as a per-channel
  `context_scale`), and the image stream's q/k/v receive additive clean-image injections `(Δq, Δk, Δv)`.
* `CleanBlock` – one block of the clean branch: LayerNorm (no AdaLN), copies of the block's image-stream
  q/k/v projections, zero-initialised Z layers producing the injections, and (except in the last block)
  copies of the output projection and feed-forward so the clean tokens evolve from block to block.
* `MDSD3Transformer` – the subclass that owns the clean branch and threads mask and injections through
  the block loop. The clean branch depends on the clean latent alone, so `encode_clean` computes every
  block's injections once per image and `forward` reuses them for all steps and both guidance halves.
* Two options a model trained with them records in its adapter config (mini v3; SD3 adapters use neither):
  an output convolution (`enable_output_conv`: a zero-initialised residual 3×3 convolution after unpatchify
  that mixes values across token borders) and the residual x-prediction (`prediction: residual_x0`:
  `residual_x0` turns the output into x̂0, `residual_velocity` x̂0 into the flow's velocity).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.utils import apply_lora_scale
from torch import nn

PREDICTIONS = ("velocity", "residual_x0")
"""What the transformer's output means: the flow-matching velocity (SD3), or Δ̂ = x̂0 − z_clean (docs/METHOD.md §7)."""
SIGMA_MIN = 0.05
"""The σ floor of the residual x-prediction's velocity v̂ = (x_t − x̂0) / max(σ, SIGMA_MIN)."""


def residual_x0(output: torch.Tensor, clean_latents: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """x̂0 of a residual x-prediction model from its output: with as many channels as the latent, Δ̂ and
    x̂0 = z_clean + Δ̂; with twice as many, (Δ̂, g) and x̂0 = z_clean + Δ̂ + g ⊙ (x_t − z_clean), a gated skip of
    what the noisy latent holds beyond the clean one (the start noise that noise-like classes keep). The clean
    latents broadcast over guidance halves, whose count must divide the batch."""
    groups = output.shape[0] // clean_latents.shape[0]
    clean = clean_latents.to(output.dtype)
    grouped = output.unflatten(0, (groups, clean_latents.shape[0]))
    channels = clean_latents.shape[1]
    if output.shape[1] == channels:
        return (grouped + clean).flatten(0, 1)
    if output.shape[1] != 2 * channels:
        raise ValueError(
            f"a residual x-prediction output has {channels} or {2 * channels} channels, not {output.shape[1]}"
        )
    delta, gate = grouped[:, :, :channels], grouped[:, :, channels:]
    beyond = noisy.to(output.dtype).unflatten(0, (groups, clean_latents.shape[0])) - clean
    return (clean + delta + gate * beyond).flatten(0, 1)


def residual_velocity(x0: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The flow velocity that x̂0 implies at x_t = (1 − σ)·x0 + σ·z_T: v̂ = (x_t − x̂0) / max(σ, SIGMA_MIN)."""
    sigma = torch.as_tensor(sigma, dtype=noisy.dtype, device=noisy.device).clamp(min=SIGMA_MIN)
    if sigma.dim():
        sigma = sigma.reshape(-1, *([1] * (noisy.dim() - 1)))
    return (noisy - x0) / sigma


class UnsupportedBaseError(ValueError):
    """The base transformer has features the MDSD3 method does not define (SD3.5's q/k norm, dual attention)."""


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, H*hd] -> [B, H, T, hd]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _add_grouped(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """x [G*Bc, T, d] + delta [Bc, T, d], broadcasting delta over the G groups (guidance halves) without copying it."""
    groups = x.shape[0] // delta.shape[0]
    return (x.unflatten(0, (groups, delta.shape[0])) + delta).flatten(0, 1)


def context_scale(head_mask: torch.Tensor, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H] head mask -> [B, 1, H*hd] per-channel scale for the context q/k/v (built once per forward)."""
    return head_mask.to(dtype).repeat_interleave(head_dim, dim=1)[:, None, :]


class MDSD3AttnProcessor:
    """SD3 joint attention with a per-head context mask and additive clean-image q/k/v injections."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        context_scale: torch.Tensor | None = None,
        clean_injection: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, image_tokens = hidden_states.shape[:2]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if clean_injection is not None:
            query = _add_grouped(query, clean_injection[0])
            key = _add_grouped(key, clean_injection[1])
            value = _add_grouped(value, clean_injection[2])

        context_q = attn.add_q_proj(encoder_hidden_states)
        context_k = attn.add_k_proj(encoder_hidden_states)
        context_v = attn.add_v_proj(encoder_hidden_states)
        if context_scale is not None:
            scale = context_scale.to(context_q.dtype)  # a no-op unless autocast changed the projections' dtype
            context_q, context_k, context_v = context_q * scale, context_k * scale, context_v * scale

        query = _split_heads(torch.cat([query, context_q], dim=1), attn.heads)
        key = _split_heads(torch.cat([key, context_k], dim=1), attn.heads)
        value = _split_heads(torch.cat([value, context_v], dim=1), attn.heads)
        out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).flatten(2).to(query.dtype)

        image_out, context_out = out[:, :image_tokens], out[:, image_tokens:]
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        if attn.context_pre_only:
            return image_out, None
        return image_out, attn.to_add_out(context_out)


class CleanBlock(nn.Module):
    """One block of the clean-image branch (docs/METHOD.md §2). `last` blocks only produce injections."""

    def __init__(self, dim: int, heads: int, last: bool):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.z_q, self.z_k, self.z_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.last = last
        if not last:
            self.to_out = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def copy_from(self, attn: Attention, ff: nn.Module) -> None:
        """Initialise from a base block's image-stream projections and feed-forward; zero the Z layers."""
        with torch.no_grad():
            for mine, base in ((self.to_q, attn.to_q), (self.to_k, attn.to_k), (self.to_v, attn.to_v)):
                mine.load_state_dict(base.state_dict())
            for z in (self.z_q, self.z_k, self.z_v):
                z.weight.zero_()
                z.bias.zero_()
            if not self.last:
                self.to_out.load_state_dict(attn.to_out[0].state_dict())
                self.ff.load_state_dict(ff.state_dict())

    def forward(self, clean_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return this block's injections [3, B, T, d] and the clean tokens for the next block (None if last)."""
        normed = self.norm1(clean_tokens)
        q, k, v = self.to_q(normed), self.to_k(normed), self.to_v(normed)
        injection = torch.stack([self.z_q(q), self.z_k(k), self.z_v(v)])
        if self.last:
            return injection, None
        attended = F.scaled_dot_product_attention(
            _split_heads(q, self.heads), _split_heads(k, self.heads), _split_heads(v, self.heads)
        )
        clean_tokens = clean_tokens + self.to_out(attended.transpose(1, 2).flatten(2))
        clean_tokens = clean_tokens + self.ff(self.norm2(clean_tokens))
        return injection, clean_tokens


class MDSD3Transformer(SD3Transformer2DModel):
    """SD3 transformer with head-wise degradation masking and a clean-image branch.

    Build it from a base model with `MDSD3Transformer.from_base(base)`; at that point (zero Z layers, no mask)
    it computes exactly what the base computes.
    """

    def __init__(self, **config: Any):
        super().__init__(**config)
        if config.get("qk_norm") or config.get("dual_attention_layers"):
            raise UnsupportedBaseError(
                "this base uses q/k normalisation or dual attention (Stable Diffusion 3.5); MDSD3 is defined for "
                "SD3-medium-style bases (qk_norm=None, no dual attention layers)"
            )
        num_layers = len(self.transformer_blocks)
        heads = self.config.num_attention_heads
        self.clean_pos_embed = PatchEmbed(
            height=self.config.sample_size,
            width=self.config.sample_size,
            patch_size=self.config.patch_size,
            in_channels=self.config.in_channels,
            embed_dim=self.inner_dim,
            pos_embed_max_size=self.config.pos_embed_max_size,
        )
        self.clean_blocks = nn.ModuleList(
            [CleanBlock(self.inner_dim, heads, last=i == num_layers - 1) for i in range(num_layers)]
        )
        self.output_conv: nn.Conv2d | None = None
        self.set_attn_processor(MDSD3AttnProcessor())

    @classmethod
    def from_base(cls, base: SD3Transformer2DModel) -> MDSD3Transformer:
        """Wrap a loaded base transformer: its modules are taken over, not copied (no second copy of 2B
        weights), so the base object afterwards runs MDSD3's attention processor too; the clean branch is
        initialised from them with zero Z layers."""
        config = {key: value for key, value in dict(base.config).items() if not key.startswith("_")}
        with torch.device("meta"):
            model = cls(**config)
        for name, child in base.named_children():
            setattr(model, name, child)
        parameter = next(base.parameters())
        model.clean_pos_embed.to_empty(device=parameter.device)
        model.clean_blocks.to_empty(device=parameter.device)
        model.clean_pos_embed.to(parameter.dtype)
        model.clean_blocks.to(parameter.dtype)
        model.set_attn_processor(MDSD3AttnProcessor())
        model.reset_clean_branch()
        return model

    def reset_clean_branch(self) -> None:
        """Copy the clean branch from the base weights and zero the Z layers (docs/METHOD.md §2)."""
        with torch.no_grad():
            self.clean_pos_embed.load_state_dict(self.pos_embed.state_dict())
        for block, clean in zip(self.transformer_blocks, self.clean_blocks):
            clean.copy_from(block.attn, block.ff)

    def enable_output_conv(self) -> None:
        """Add the output convolution: a residual 3×3 convolution over the unpatchified output, zero-initialised
        (the model's output is unchanged until it trains). Adapters trained with it record `output_conv: true`."""
        parameter = next(self.proj_out.parameters())
        conv = nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        self.output_conv = conv.to(device=parameter.device, dtype=parameter.dtype)

    def adapter_modules(self) -> dict[str, nn.Module]:
        """The modules MDSD3 adds on top of the base."""
        modules = {"clean_pos_embed": self.clean_pos_embed, "clean_blocks": self.clean_blocks}
        if self.output_conv is not None:
            modules["output_conv"] = self.output_conv
        return modules

    def encode_clean(self, clean_latents: torch.Tensor) -> torch.Tensor:
        """All blocks' injections for a batch of clean latents: a tensor [N, 3, B, T, d].

        Depends on the clean latent alone: compute once per image, reuse for every step and both guidance halves.
        """
        tokens = self.clean_pos_embed(clean_latents).contiguous()
        cache = None
        for index, clean in enumerate(self.clean_blocks):
            injection, tokens = clean(tokens)
            if cache is None:
                cache = injection.new_empty((len(self.clean_blocks), *injection.shape))
            cache[index] = injection
        return cache

    @apply_lora_scale("joint_attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        head_mask: torch.Tensor | None = None,
        clean_injections: torch.Tensor | None = None,
        clean_latents: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """Predict the flow-matching velocity, or Δ̂ for an adapter trained for the residual x-prediction.

        head_mask: [B, H] per-sample, per-head context scale in [0, 1]; None means all ones.
        clean_injections: from `encode_clean` for Bc images, with B a multiple of Bc (guidance halves share it).
        clean_latents: the uncached path (training, reference): the branch runs inside the block loop.
        """
        if clean_injections is not None and clean_latents is not None:
            raise ValueError("pass clean_injections or clean_latents, not both")
        height, width = hidden_states.shape[-2:]
        hidden_states = self.pos_embed(hidden_states).contiguous()
        temb = self.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        clean_tokens = None if clean_latents is None else self.clean_pos_embed(clean_latents).contiguous()
        extra = dict(joint_attention_kwargs or {})
        if head_mask is not None:
            extra["context_scale"] = context_scale(head_mask, self.config.attention_head_dim, hidden_states.dtype)

        for index, block in enumerate(self.transformer_blocks):
            checkpoint = torch.is_grad_enabled() and self.gradient_checkpointing
            if clean_tokens is not None:
                clean = self.clean_blocks[index]
                injection, clean_tokens = (
                    self._gradient_checkpointing_func(clean, clean_tokens) if checkpoint else clean(clean_tokens)
                )
            else:
                injection = None if clean_injections is None else clean_injections[index]
            kwargs = extra if injection is None else {**extra, "clean_injection": injection}
            if checkpoint:
                encoder_hidden_states, hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, encoder_hidden_states, temb, kwargs
                )
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states,
                    encoder_hidden_states=encoder_hidden_states,
                    temb=temb,
                    joint_attention_kwargs=kwargs,
                )

        hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
        patch = self.config.patch_size
        hidden_states = hidden_states.reshape(-1, height // patch, width // patch, patch, patch, self.out_channels)
        output = torch.einsum("nhwpqc->nchpwq", hidden_states).reshape(-1, self.out_channels, height, width)
        if self.output_conv is not None:
            output = output + self.output_conv(output)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
