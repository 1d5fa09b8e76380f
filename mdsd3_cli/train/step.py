"""What one training step computes: the trainable sets, the seeded randomness, the flow-matching loss and its
inputs (prompts, head masks, VAE latents). docs/METHOD.md §4; diffusers' SD3 training scripts, with the degraded
latent as x0:

    σ ~ logit-normal, discretised on the base scheduler's training table (shift 3 for SD3), timestep = σ·1000
    z_T = α·ε + β·z_clean                   the flow's source, `train.start` (default α 1, β 0: z_T = ε)
    x_t = (1 - σ)·x0 + σ·z_T                x0 = VAE latent of the DEGRADED image, ε ~ N(0, I)
    loss = w(σ)·|v(x_t, t, prompt, head_mask, clean latent) - (z_T - x0)|²   (w = 1 for logit-normal)

With the default start the loss is exactly diffusers' (ε - x0 target); another start trains the adapter for
sampling from that start (docs/METHOD.md §4), which the exported adapter records (`start` in its config).

The clean latent enters through the clean branch (`clean_latents=`, the uncached path), the classes through
the prompt and the per-head mask (docs/METHOD.md §1). Identity pairs have all-zero ratios: prompt "clean", zero mask.
Condition-dropped samples get the prompt "" and a zero mask (the unconditional branch of guidance).

Determinism: ε and σ come from a generator seeded by (data.seed, data step, rank) (`step_generator`), never from
a global RNG.

Decisions:
* Trainable sets. `default`: the clean branch (patch embed, q/k/v, out, FF copies and the Z layers) + LoRA on
  the context stream's attention projections. `lora_only` (small GPUs): LoRA + the Z layers only; the Z layers
  are kept because they start at zero and are the only path from the clean image into the model: without them
  a fresh adapter would ignore the clean image. The rest of the clean branch stays frozen. The base is always
  frozen and never stored.
* Latents (`LatentEncoder`) are encoded one image at a time, so a latent never depends on what it was batched
  with: training with and without `data.cache_latents` is the same to the bit, and so are resumes.
* `data.cache_latents`: an in-memory cache of VAE latents keyed by image file and flip (the batch's `clean_key`
  and `degraded_key`, `train.data`); the trainer's loader then decodes each image and flip once per loader process
  and sends placeholder pixels afterwards. It is refused with `data.random_crop: true`, where no two samples share
  pixels and the cache would only grow. Memory: one latent per image file and flip, per process.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mdsd3_cli.model.adapter import FlowStart
from mdsd3_cli.model.heads import UNCONDITIONAL_PROMPT, head_mask
from mdsd3_cli.model.prompts import PromptEmbedding
from mdsd3_cli.model.sampler import initial_latents
from mdsd3_cli.model.transformer import PREDICTIONS, MDSD3Transformer, residual_x0
from mdsd3_cli.model.weights import BaseModel
from mdsd3_cli.train.data import batch_prompts
from mdsd3_cli.train.errors import TrainError

TRAINABLE_SETS = ("default", "lora_only")
WEIGHTING_SCHEME = "logit_normal"
_NOISE_STREAM = 0x70F5
RESIDUAL_LOSS_SIGMA_FLOOR = 0.2
"""The residual x-prediction's loss weights the x0 error by 1 / max(σ, this)² (see `flow_matching_loss`)."""


def is_trainable(name: str, trainable: str) -> bool:
    """Whether parameter `name` of an MDSD3Transformer trains under `trainable` (see module docstring)."""
    if trainable not in TRAINABLE_SETS:
        raise ValueError(f"unknown trainable set {trainable!r}; choose one of {TRAINABLE_SETS}")
    if "lora_" in name:
        return True
    if trainable == "default":
        return name.startswith(("clean_pos_embed.", "clean_blocks."))
    return name.startswith("clean_blocks.") and re.search(r"\.z_[qkv]\.", name) is not None


def set_trainable(model: MDSD3Transformer, trainable: str) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze the chosen set; returns its parameters (in module order)."""
    params = []
    for name, param in model.named_parameters():
        train = is_trainable(name, trainable)
        param.requires_grad_(train)
        if train:
            params.append(param)
    if not params:
        raise TrainError(f"trainable set {trainable!r} selects no parameters (lora_only needs train.lora_rank > 0)")
    return params


def upcast_trainable(model: torch.nn.Module) -> None:
    """fp32 master copies for the trainable parameters (the frozen base keeps its dtype)."""
    from diffusers.training_utils import cast_training_params

    cast_training_params(model, dtype=torch.float32)


def step_generator(seed: int, data_step: int, rank: int) -> torch.Generator:
    """The CPU generator for ε and σ at one data step of one rank: a pure function of its arguments."""
    words = np.random.SeedSequence([int(seed), _NOISE_STREAM, int(data_step), int(rank)]).generate_state(2, np.uint32)
    return torch.Generator("cpu").manual_seed(int(words[0]) << 32 | int(words[1]))


@dataclass(frozen=True)
class FlowSchedule:
    """The base scheduler's training table: σ_i (shifted) and timesteps t_i = σ_i · num_train_timesteps."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    @classmethod
    def from_base(cls, base: BaseModel) -> FlowSchedule:
        scheduler = base.make_scheduler()
        return cls(scheduler.sigmas.detach().float().cpu().clone(), scheduler.timesteps.detach().float().cpu().clone())

    def draw(
        self, batch: int, generator: torch.Generator, logit_mean: float, logit_std: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ [B], timestep [B]) on the CPU, σ logit-normal as in diffusers' SD3 training scripts."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            WEIGHTING_SCHEME, batch, logit_mean, logit_std, device="cpu", generator=generator
        )
        index = (u * len(self.timesteps)).long().clamp_(0, len(self.timesteps) - 1)
        return self.sigmas[index], self.timesteps[index]


def flow_matching_loss(
    model: torch.nn.Module,
    clean_latents: torch.Tensor,
    target_latents: torch.Tensor,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    schedule: FlowSchedule,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    noise_generator: torch.Generator | None = None,
    start: FlowStart | None = None,
    prediction: str = "velocity",
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flow-matching loss of one batch; σ drawn from `generator` on the CPU, ε too (device independent) unless
    `noise_generator` is given: then ε is drawn on that generator's device (fast, device dependent), or `noise`
    is given: then ε is that tensor (mini's training couples its degradations to it).

    The flow runs from `start` (z_T = α·ε + β·z_clean, default pure noise) to the degraded latent; the pure-noise
    start uses ε itself, so its loss is diffusers' to the bit. With `prediction="residual_x0"` (mini v3) the
    model's output gives x̂0 (`residual_x0`: z_clean + Δ̂, with the gated skip + g ⊙ (x_t − z_clean)), and the loss is |x̂0 − x0|² / max(σ, 0.2)²: for σ ≥ 0.2 (every σ a
    sampler of up to 5 steps visits) exactly the velocity error of v̂ = (x_t − x̂0)/σ, below it an x0 error
    weighted 25, not the 1/σ² that grows without bound where x_t already shows x0 (docs/METHOD.md §7)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    device = target_latents.device
    x0 = target_latents.float()
    sigmas, timesteps = schedule.draw(x0.shape[0], generator, logit_mean, logit_std)
    if noise is not None:
        if noise.shape != x0.shape:
            raise ValueError(f"noise of shape {tuple(noise.shape)} for latents of shape {tuple(x0.shape)}")
        noise = noise.to(device, torch.float32)
    elif noise_generator is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device)
    else:
        noise = torch.randn(x0.shape, generator=noise_generator, dtype=torch.float32, device=noise_generator.device)
    if start is not None and not start.is_pure_noise:
        weights = [torch.full((x0.shape[0],), value, device=device) for value in (start.alpha, start.beta)]
        source = initial_latents(noise, clean_latents.float(), *weights)
    else:
        source = noise
    sigma = sigmas.to(device).view(-1, *([1] * (x0.dim() - 1)))
    noisy = (1.0 - sigma) * x0 + sigma * source
    output = model(
        hidden_states=noisy,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        timestep=timesteps.to(device),
        head_mask=mask,
        clean_latents=clean_latents,
        return_dict=False,
    )[0].float()
    weighting = compute_loss_weighting_for_sd3(WEIGHTING_SCHEME, sigmas=sigma)
    if prediction == "residual_x0":
        floor = sigma.clamp(min=RESIDUAL_LOSS_SIGMA_FLOOR)
        error = weighting.float() * ((residual_x0(output, clean_latents.float(), noisy) - x0) / floor) ** 2
    else:
        error = weighting.float() * (output - (source - x0)) ** 2
    return error.reshape(x0.shape[0], -1).mean(dim=1).mean()


def batch_conditioning(
    ratios: torch.Tensor, dropped: torch.Tensor, classes: Sequence[str], partition: Sequence[Sequence[int]]
) -> tuple[list[str], torch.Tensor]:
    """Prompts and [B, H] head masks of a batch: class prompt + ratio mask; dropped rows "" + zero mask."""
    prompts = batch_prompts(ratios, classes)
    mask = head_mask(ratios.tolist(), partition)
    for row in torch.nonzero(dropped).flatten().tolist():
        prompts[row] = UNCONDITIONAL_PROMPT
        mask[row] = 0.0
    return prompts, mask


class PromptTable:
    """Cached prompt embeddings resident on the training device; `batch` stacks them per sample."""

    def __init__(self, embeddings: Mapping[str, PromptEmbedding], device: torch.device):
        self.embeds = {p: e.embeds.to(device, torch.float32) for p, e in embeddings.items()}
        self.pooled = {p: e.pooled.to(device, torch.float32) for p, e in embeddings.items()}

    def batch(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([self.embeds[p] for p in prompts]), torch.stack([self.pooled[p] for p in prompts])


class LatentEncoder:
    """Pixels in [-1, 1] -> SD3 latents (docs/METHOD.md §5), one image at a time; with `cache`, each image key's
    latent is encoded once and kept (see the module docstring)."""

    def __init__(self, vae: torch.nn.Module, device: torch.device, cache: bool = False):
        self.vae, self.device = vae, device
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()
        return ((latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor).float()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] pixels -> [B, C, h, w] latents on the device, never cached."""
        return torch.cat([self._encode(image[None]) for image in pixels])

    def pair(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean latents, degraded latents) of a batch: `clean`, `degraded` and, with the cache, `clean_key`,
        `degraded_key`, `clean_decoded` and `degraded_decoded` (see `train.data`); placeholder pixels are never
        encoded."""
        sides = ("clean", "degraded")
        if self.cache is None:
            return self(batch["clean"]), self(batch["degraded"])
        for side in sides:
            rows = zip(batch[side], batch[f"{side}_key"].tolist(), batch[f"{side}_decoded"].tolist())
            for image, key, decoded in rows:
                if decoded and key not in self.cache:
                    self.cache[key] = self._encode(image[None])[0].cpu()
        keys = [batch[f"{side}_key"].tolist() for side in sides]
        missing = sorted({key for column in keys for key in column} - self.cache.keys())
        if missing:
            raise RuntimeError(f"image keys {missing} are neither decoded in this batch nor cached")
        clean, degraded = (torch.stack([self.cache[key] for key in column]).to(self.device) for column in keys)
        return clean, degraded
