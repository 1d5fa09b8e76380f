"""The MDSD3 sampler: α/β initial latents, SD3 flow-matching Euler, classifier-free guidance, optional token-grid
shift averaging, and the residual x-prediction of adapters trained for it (docs/METHOD.md §1, §3, §6, §7).

Each sample brings its own class ratios, α, β and seed; its noise comes from its own seed on the CPU, so a
sample's output does not depend on batch size, order or device count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mdsd3_cli.model.adapter import AdapterConfig
from mdsd3_cli.model.grid_shifts import grid_offsets, roll
from mdsd3_cli.model.heads import UNCONDITIONAL_PROMPT, head_mask, prompt_for, ratio_vector
from mdsd3_cli.model.prompts import PromptEmbedding
from mdsd3_cli.model.transformer import MDSD3Transformer, residual_velocity, residual_x0
from mdsd3_cli.model.weights import BaseModel


@dataclass(frozen=True)
class SampleRequest:
    """One sample: class ratios (absent class = 0), initial-latent weights and noise seed."""

    ratios: Mapping[str, float]
    seed: int
    alpha: float = 1.0
    beta: float = 0.0


@dataclass
class Conditioning:
    """What one transformer branch is conditioned on: text embeddings and the per-head mask, per sample."""

    embeds: torch.Tensor  # [B, S, D]
    pooled: torch.Tensor  # [B, P]
    head_mask: torch.Tensor  # [B, H]


def is_guided(guidance: float) -> bool:
    """Classifier-free guidance is on above 1; at or below 1 only the conditional branch runs."""
    return guidance > 1.0


def seeded_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise, one CPU generator per sample seed: [len(seeds), *shape] float32."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds])


def initial_latents(
    noise: torch.Tensor, clean_latents: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor
) -> torch.Tensor:
    """z_T = α·ε + β·z_clean, per sample (docs/METHOD.md §3)."""
    view = (-1,) + (1,) * (noise.dim() - 1)
    return alpha.view(view) * noise + beta.view(view) * clean_latents


class MDSD3Sampler:
    """Turns clean images plus per-sample requests into degraded images with an MDSD3 transformer."""

    def __init__(
        self,
        base: BaseModel,
        model: MDSD3Transformer,
        adapter: AdapterConfig,
        prompts: Mapping[str, PromptEmbedding],
        grid_shifts: int = 1,
    ):
        self.base = base
        self.model = model
        self.vae = base.vae  # AutoencoderKL or a pixel codec with its interface
        self.adapter = adapter
        self.prompts = dict(prompts)
        self.offsets = grid_offsets(grid_shifts, model.config.patch_size)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    # -- VAE ---------------------------------------------------------------------------------------------------
    # The VAE runs one image at a time: convolution kernels may pick another algorithm for another batch
    # size, which would make a sample's bytes depend on its batch. It also bounds the VAE's peak memory.
    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> clean latents (SD3 shift and scale applied)."""
        images = pixels.to(self.device).permute(0, 3, 1, 2).to(self.vae.dtype) / 127.5 - 1.0
        latents = torch.cat([self.vae.encode(image[None]).latent_dist.mode() for image in images])
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> uint8 [B, H, W, 3] numpy."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        images = torch.cat([self.vae.decode(latent[None]).sample for latent in latents])
        images = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        return (images * 255).round().to(torch.uint8).cpu().numpy()

    # -- conditioning ------------------------------------------------------------------------------------------
    def _embedding(self, prompt: str) -> PromptEmbedding:
        if prompt not in self.prompts:
            raise KeyError(f"prompt {prompt!r} has no cached embedding; encode it first (mdsd3 encode-prompts)")
        return self.prompts[prompt]

    def conditioning(self, prompts: Sequence[str], masks: torch.Tensor) -> Conditioning:
        """Stack cached embeddings per sample (repeated by the caller's list, never by the pipeline)."""
        rows = [self._embedding(p) for p in prompts]
        embeds = torch.stack([r.embeds for r in rows]).to(self.device, self.dtype)
        pooled = torch.stack([r.pooled for r in rows]).to(self.device, self.dtype)
        return Conditioning(embeds, pooled, masks.to(self.device, self.dtype))

    def request_conditioning(
        self, requests: Sequence[SampleRequest], unconditional: bool = True
    ) -> tuple[Conditioning, Conditioning | None]:
        """(conditional, unconditional) branches (docs/METHOD.md §1): class prompt + ratio mask; "" + all-zero mask.
        Without guidance (`unconditional=False`) the unconditional branch is None and "" need not be cached."""
        classes = self.adapter.classes
        rows = [ratio_vector(r.ratios, classes) for r in requests]
        mask = head_mask(rows, self.adapter.head_partition)
        cond = self.conditioning([prompt_for(r.ratios, classes) for r in requests], mask)
        if not unconditional:
            return cond, None
        uncond = self.conditioning([UNCONDITIONAL_PROMPT] * len(requests), torch.zeros_like(mask))
        return cond, uncond

    # -- denoising ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        clean_injections: Sequence[torch.Tensor],
        cond: Conditioning,
        uncond: Conditioning | None,
        steps: int,
        guidance: float,
        clean_latents: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """SD3 flow-matching Euler from σ = 1; guidance when `guidance > 1` and an unconditional branch is given.

        `clean_injections` holds one `encode_clean` result per grid offset (`self.offsets`, one without grid
        shifts), of the clean latents rolled by that offset; each step's prediction is the mean over the offsets of
        the prediction for the rolled latents, rolled back. An adapter trained for the residual x-prediction
        (`prediction: residual_x0`) needs `clean_latents`, rolled likewise: its output gives x̂0 (`residual_x0`),
        the step's velocity is (x_t − x̂0)/σ, and the last step (to σ = 0) returns x̂0 itself."""
        if len(clean_injections) != len(self.offsets):
            raise ValueError(f"{len(clean_injections)} clean injections for {len(self.offsets)} grid offsets")
        residual = self.adapter.prediction == "residual_x0"
        if residual and (clean_latents is None or len(clean_latents) != len(self.offsets)):
            raise ValueError("a residual x-prediction adapter needs the clean latents of every grid offset")
        scheduler = self.base.make_scheduler()
        scheduler.set_timesteps(steps, device=self.device)
        guided = is_guided(guidance) and uncond is not None
        if guided:
            embeds = torch.cat([uncond.embeds, cond.embeds])
            pooled = torch.cat([uncond.pooled, cond.pooled])
            mask = torch.cat([uncond.head_mask, cond.head_mask])
        else:
            embeds, pooled, mask = cond.embeds, cond.pooled, cond.head_mask
        latents = latents.to(self.dtype)
        for index, t in enumerate(scheduler.timesteps):
            predictions = []
            for offset_index, (offset, injections) in enumerate(zip(self.offsets, clean_injections)):
                rolled = roll(latents, offset)
                model_input = torch.cat([rolled, rolled]) if guided else rolled
                prediction = self.model(
                    hidden_states=model_input,
                    encoder_hidden_states=embeds,
                    pooled_projections=pooled,
                    timestep=t.expand(model_input.shape[0]),
                    head_mask=mask,
                    clean_injections=injections,
                    return_dict=False,
                )[0]
                if residual:  # x̂0 (linear in Δ̂: guidance and the offsets' mean act on it as on the velocity)
                    prediction = residual_x0(prediction, clean_latents[offset_index].to(self.dtype), model_input)
                if guided:
                    uncond_p, cond_p = prediction.chunk(2)
                    prediction = uncond_p + guidance * (cond_p - uncond_p)
                predictions.append(roll(prediction, offset, -1))
            prediction = predictions[0] if len(predictions) == 1 else torch.stack(predictions).mean(0)
            if residual:
                if float(scheduler.sigmas[index + 1]) == 0.0:
                    return prediction  # the last Euler step lands on x̂0 exactly
                prediction = residual_velocity(prediction, latents, scheduler.sigmas[index].to(self.device))
            latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
        return latents

    @torch.no_grad()
    def generate(
        self,
        pixels: torch.Tensor,
        requests: Sequence[SampleRequest],
        steps: int,
        guidance: float,
        output: str = "np",
        pad_to: int | None = None,
    ) -> np.ndarray | torch.Tensor:
        """Degrade a batch of clean uint8 images [B, H, W, 3]; returns uint8 numpy images or latents.

        `pad_to` runs the transformer on a batch of at least that many samples (the last one repeated, its
        copies discarded). Kernels may pick another algorithm for another batch shape, so a run that always
        uses the same transformer batch gives every sample the same bytes, however partial its batch was.
        On the CPU every sample runs alone (batch 1), which makes its bytes independent of its batch.
        """
        if len(pixels) != len(requests):
            raise ValueError(f"{len(pixels)} images but {len(requests)} requests")
        count = len(requests)
        if self.device.type == "cpu":
            pad_to = None  # padding only matters for batched kernels; the CPU runs one sample at a time
        if self.device.type == "cpu" and count > 1:
            # CPU matrix kernels (MKL on AMD EPYC, seen here) give a row other bits depending on its position in
            # the batch, so on the CPU each sample runs alone and its bytes never depend on its batch mates.
            latents = torch.cat(
                [
                    self.generate(pixels[i : i + 1], requests[i : i + 1], steps, guidance, output="latent")
                    for i in range(count)
                ]
            )
            return latents if output == "latent" else self.decode(latents)
        clean_latents = self.encode(pixels)
        padding = max((pad_to or count) - count, 0)
        if padding:
            clean_latents = torch.cat([clean_latents, clean_latents[-1:].expand(padding, *clean_latents.shape[1:])])
            requests = [*requests, *[requests[-1]] * padding]
        rolled = [roll(clean_latents, offset).to(self.dtype) for offset in self.offsets]
        injections = [self.model.encode_clean(shifted) for shifted in rolled]
        noise = seeded_noise([r.seed for r in requests], clean_latents.shape[1:]).to(self.device)
        alpha = torch.tensor([r.alpha for r in requests], device=self.device)
        beta = torch.tensor([r.beta for r in requests], device=self.device)
        latents = initial_latents(noise, clean_latents.float(), alpha, beta)
        cond, uncond = self.request_conditioning(requests, unconditional=is_guided(guidance))
        latents = self.denoise(latents, injections, cond, uncond, steps, guidance, rolled)[:count]
        return latents if output == "latent" else self.decode(latents)
