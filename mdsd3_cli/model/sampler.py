"""The MDSD3 sampler: α/β initial latents, SD3 flow-matching Euler, classifier-free guidance, optional token-grid
shift averaging, and the residual x-prediction of adapters trained for it (docs/METHOD.md §1, §3, §6, §7).

Each sample brings its own class ratios, α, β and seed; its noise comes from its own seed on the CPU, so a
sample's output does not depend on batch size, order or device count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

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
    class_guidance: Mapping[str, float] = field(default_factory=dict)
    """Guidance per class this sample draws (`sampling.class_guidance`): each step adds (G − 1)·(prediction −
    prediction without that class)."""

    def without(self, name: str) -> dict[str, float]:
        """This sample's ratios with class `name` absent: the branch its class guidance contrasts with."""
        return {other: ratio for other, ratio in self.ratios.items() if other != name}


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


Prediction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(latents [B, C, H, W], timestep) -> a prediction shaped like the latents: a flow velocity, or x̂0."""


def stacked(*branches: Conditioning) -> Conditioning:
    """Branches' conditioning as one batch: the first branch's samples, then the next's."""
    return Conditioning(
        torch.cat([branch.embeds for branch in branches]),
        torch.cat([branch.pooled for branch in branches]),
        torch.cat([branch.head_mask for branch in branches]),
    )


def transformer_prediction(
    model: MDSD3Transformer, cond: Conditioning, injections: torch.Tensor, clean_latents: torch.Tensor | None = None
) -> Prediction:
    """The transformer's output under `cond` with `injections` (its clean branch); with `clean_latents` (an adapter
    trained for the residual x-prediction) the x̂0 it gives (`residual_x0`)."""

    def predict(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        output = model(
            hidden_states=latents,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            timestep=timestep.expand(latents.shape[0]),
            head_mask=cond.head_mask,
            clean_injections=injections,
            return_dict=False,
        )[0]
        return output if clean_latents is None else residual_x0(output, clean_latents, latents)

    return predict


def guided(prediction: Prediction, guidance: float, class_scales: Sequence[float] = ()) -> Prediction:
    """Guidance around a prediction conditioned on [unconditional (when `guidance` > 1); conditional; the
    conditional without class k, for each k of `class_scales`] branches, run in one batch: classifier-free
    guidance u + guidance·(c − u) (or c alone), plus class guidance Σ_k (G_k − 1)·(c − c without k). Linear, so it
    acts on x̂0 as on a velocity."""
    unconditional = is_guided(guidance)
    branches = len(class_scales) + (2 if unconditional else 1)

    def predict(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        outputs = prediction(torch.cat([latents] * branches), timestep).chunk(branches)
        if unconditional:
            uncond, cond, contrasts = outputs[0], outputs[1], outputs[2:]
            result = uncond + guidance * (cond - uncond)
        else:
            cond, contrasts = outputs[0], outputs[1:]
            result = cond
        for scale, without in zip(class_scales, contrasts):
            result = result + (scale - 1.0) * (cond - without)
        return result

    return predict


def shift_averaged(predictions: Sequence[Prediction], offsets: Sequence[tuple[int, int]]) -> Prediction:
    """Token-grid shift averaging (docs/METHOD.md §6): the mean over `offsets` of each offset's prediction for the
    latents rolled by it, rolled back; with one offset (0, 0), that prediction itself."""

    def predict(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        rolled_back = [
            roll(prediction(roll(latents, offset), timestep), offset, -1)
            for prediction, offset in zip(predictions, offsets)
        ]
        return rolled_back[0] if len(rolled_back) == 1 else torch.stack(rolled_back).mean(0)

    return predict


def euler_step(
    latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """x + (σ_next − σ)·v, in float32 and cast to the velocity's dtype, as FlowMatchEulerDiscreteScheduler.step."""
    return (latents.float() + (sigma_next - sigma) * velocity).to(velocity.dtype)


def sample_euler(
    velocity: Prediction, latents: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor
) -> torch.Tensor:
    """Flow-matching Euler over a velocity: one step per timestep, from sigmas[0] to sigmas[-1]."""
    for index, timestep in enumerate(timesteps):
        latents = euler_step(latents, velocity(latents, timestep), sigmas[index], sigmas[index + 1])
    return latents


def sample_euler_x0(
    denoised: Prediction, latents: torch.Tensor, timesteps: torch.Tensor, sigmas: torch.Tensor
) -> torch.Tensor:
    """Flow-matching Euler over an x̂0 prediction (docs/METHOD.md §7): each step's velocity is (x_t − x̂0)/σ, and
    the step to σ = 0 returns x̂0 itself."""
    for index, timestep in enumerate(timesteps):
        x0 = denoised(latents, timestep)
        if float(sigmas[index + 1]) == 0.0:
            return x0
        velocity = residual_velocity(x0, latents, sigmas[index])
        latents = euler_step(latents, velocity, sigmas[index], sigmas[index + 1])
    return latents


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

    def contrast_conditioning(self, requests: Sequence[SampleRequest]) -> list[Conditioning]:
        """One branch per class of the requests' (shared) class guidance: each sample without that class."""
        classes = self.adapter.classes
        branches = []
        for name in requests[0].class_guidance:
            rows = [request.without(name) for request in requests]
            mask = head_mask([ratio_vector(row, classes) for row in rows], self.adapter.head_partition)
            branches.append(self.conditioning([prompt_for(row, classes) for row in rows], mask))
        return branches

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
        contrasts: Sequence[Conditioning] = (),
        class_scales: Sequence[float] = (),
    ) -> torch.Tensor:
        """SD3 flow-matching Euler from σ = 1; guidance when `guidance > 1` and an unconditional branch is given.

        `clean_injections` holds one `encode_clean` result per grid offset (`self.offsets`, one without grid
        shifts), of the clean latents rolled by that offset; each step's prediction is the mean over the offsets of
        the prediction for the rolled latents, rolled back. An adapter trained for the residual x-prediction
        (`prediction: residual_x0`) needs `clean_latents`, rolled likewise: its output gives x̂0 (`residual_x0`),
        the step's velocity is (x_t − x̂0)/σ, and the last step (to σ = 0) returns x̂0 itself. `contrasts` (the
        samples without class k) and `class_scales` (G_k) add class guidance (`guided`)."""
        if len(clean_injections) != len(self.offsets):
            raise ValueError(f"{len(clean_injections)} clean injections for {len(self.offsets)} grid offsets")
        residual = self.adapter.prediction == "residual_x0"
        if residual and (clean_latents is None or len(clean_latents) != len(self.offsets)):
            raise ValueError("a residual x-prediction adapter needs the clean latents of every grid offset")
        scheduler = self.base.make_scheduler()
        scheduler.set_timesteps(steps, device=self.device)
        guided_run = is_guided(guidance) and uncond is not None
        unconditional = [uncond] if guided_run else []
        branches = stacked(*unconditional, cond, *contrasts) if unconditional or contrasts else cond
        predictions = [
            transformer_prediction(
                self.model, branches, injections, clean_latents[index].to(self.dtype) if residual else None
            )
            for index, injections in enumerate(clean_injections)
        ]
        if unconditional or contrasts:
            scale = guidance if guided_run else 1.0
            predictions = [guided(prediction, scale, class_scales) for prediction in predictions]
        prediction = shift_averaged(predictions, self.offsets)
        euler = sample_euler_x0 if residual else sample_euler
        return euler(prediction, latents.to(self.dtype), scheduler.timesteps, scheduler.sigmas)

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
        On the CPU every sample runs alone (batch 1), which makes its bytes independent of its batch. Samples
        with other class guidance need other branches: each kind runs as its own batch.
        """
        if len(pixels) != len(requests):
            raise ValueError(f"{len(pixels)} images but {len(requests)} requests")
        count = len(requests)
        groups: dict[tuple[tuple[str, float], ...], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(tuple(request.class_guidance.items()), []).append(index)
        if len(groups) > 1:  # samples with other class guidance run other branches: one batch per kind
            parts = [
                self.generate(pixels[ids], [requests[i] for i in ids], steps, guidance, output="latent", pad_to=pad_to)
                for ids in groups.values()
            ]
            order = torch.tensor([index for ids in groups.values() for index in ids])
            latents = torch.cat(parts)[torch.argsort(order)]
            return latents if output == "latent" else self.decode(latents)
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
        contrasts = self.contrast_conditioning(requests)
        scales = list(requests[0].class_guidance.values())
        latents = self.denoise(latents, injections, cond, uncond, steps, guidance, rolled, contrasts, scales)[:count]
        return latents if output == "latent" else self.decode(latents)
