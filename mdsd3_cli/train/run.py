"""`mdsd3 train`: learn an MDSD3 adapter from clean/degraded pairs (docs/METHOD.md §4).

One process or many (`accelerate launch` / torchrun); the loop is accelerate's: `accumulate`, `backward`,
`clip_grad_norm_`, `save_state` / `load_state`.

What a step computes (diffusers' SD3 training scripts, with the degraded latent as x0):

    σ ~ logit-normal, discretised on the base scheduler's training table (shift 3 for SD3), timestep = σ·1000
    z_T = α·ε + β·z_clean                   the flow's source, `train.start` (default α 1, β 0: z_T = ε)
    x_t = (1 - σ)·x0 + σ·z_T                x0 = VAE latent of the DEGRADED image, ε ~ N(0, I)
    loss = w(σ)·|v(x_t, t, prompt, head_mask, clean latent) - (z_T - x0)|²   (w = 1 for logit-normal)

With the default start the loss is exactly diffusers' (ε - x0 target); another start trains the adapter for
sampling from that start (docs/METHOD.md §4), which the exported adapter records (`start` in its config).

The clean latent enters through the clean branch (`clean_latents=`, the uncached path), the classes through
the prompt and the per-head mask (docs/METHOD.md §1). Identity pairs have all-zero ratios: prompt "clean", zero mask.
Condition-dropped samples get the prompt "" and a zero mask (the unconditional branch of guidance).

Determinism: the data of data step d (= optimizer step · grad_accum + micro step) is a pure function of
(data.seed, d, slot) (see train_data); ε and σ come from a generator seeded by (data.seed, d, rank); the
condition drop from `condition_drop_mask(data.seed, d, ...)`. Nothing reads a global RNG, so a resumed run
repeats the uninterrupted run's losses exactly (on the CPU; GPU kernels may differ in the last bits).

Decisions:
* Trainable sets. `default`: the clean branch (patch embed, q/k/v, out, FF copies and the Z layers) + LoRA on
  the context stream's attention projections. `lora_only` (small GPUs): LoRA + the Z layers only; the Z layers
  are kept because they start at zero and are the only path from the clean image into the model: without them
  a fresh adapter would ignore the clean image. The rest of the clean branch stays frozen. The base is always
  frozen and never stored.
* Precision: frozen base (and VAE) in bf16 on GPU, trainable parameters in fp32, bf16 autocast (accelerate's
  mixed precision); on the CPU everything fp32 without autocast.
* `data.cache_latents`: an in-memory cache of VAE latents keyed by the exact pixels (a hash of the tensor),
  encoded one image at a time so a cached latent equals a fresh one bit for bit (resumes stay exact). It is
  refused with `data.random_crop: true`, where no two samples share pixels and the cache would only grow.
  Flips are fine (two entries per pair). Memory: 2 latents per pair and flip, per process.
* Checkpoints hold the adapter tensors (safetensors, also a loadable adapter folder), optimizer, LR schedule,
  accelerate's RNG/step state, and `trainer_state.json` (the optimizer step and run facts). The 2B frozen base
  weights are popped from accelerate's `weights` list in a save hook, as diffusers' LoRA scripts do.
  A checkpoint is written to `.tmp-step-N` and renamed when complete; older ones are deleted after that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import rich.console
from rich.markup import escape
from rich.table import Table

from mdsd3_cli import __version__
from mdsd3_cli.util.atomic import atomic_write, ensure_folder, fresh_folder, open_append
from mdsd3_cli.dataset.ownership import OutputLock
from mdsd3_cli.model.adapter import WEIGHTS_NAME, AdapterConfig, AdapterError, FlowStart, read_adapter_config
from mdsd3_cli.model.heads import UNCONDITIONAL_PROMPT, all_prompts, head_mask
from mdsd3_cli.model.transformer import MDSD3Transformer
from mdsd3_cli.util.progress import Console, RunProgress
from mdsd3_cli.model.prompts import PromptEmbedding, load_prompt_embeddings
from mdsd3_cli.util.runtime import StopRequest, exit_code_for
from mdsd3_cli.model.sampler import MDSD3Sampler, SampleRequest, initial_latents
from mdsd3_cli.train.data import Draw, PairedDataset, batch_prompts, build_dataset, condition_drop_mask
from mdsd3_cli.recipe.train import TrainRecipe
from mdsd3_cli.model.weights import PARAMETER_GROUPS, BaseModel, add_lora, build_model, describe_parameters, fingerprint_base, fresh_adapter_config, load_base, save_adapter

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
STATE_FORMAT = "mdsd3-train-state"
LOG_NAME = "log.jsonl"
ADAPTER_DIR = "adapter"
PREVIEWS = "previews"
TRAINABLE_SETS = ("default", "lora_only")
WEIGHTING_SCHEME = "logit_normal"
_NOISE_STREAM = 0x70F5
_CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


class TrainError(ValueError):
    """A training run that cannot start or resume; the message says what to change."""


# ---------------------------------------------------------------------------------------------- trainable sets


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


# ---------------------------------------------------------------------------------------------- randomness, loss


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
    def from_base(cls, base: BaseModel) -> "FlowSchedule":
        scheduler = base.make_scheduler()
        return cls(scheduler.sigmas.detach().float().cpu().clone(), scheduler.timesteps.detach().float().cpu().clone())

    def draw(self, batch: int, generator: torch.Generator, logit_mean: float, logit_std: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ [B], timestep [B]) on the CPU, σ logit-normal as in diffusers' SD3 training scripts."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(WEIGHTING_SCHEME, batch, logit_mean, logit_std,
                                                  device="cpu", generator=generator)
        index = (u * len(self.timesteps)).long().clamp_(0, len(self.timesteps) - 1)
        return self.sigmas[index], self.timesteps[index]


def flow_matching_loss(model: torch.nn.Module, clean_latents: torch.Tensor, target_latents: torch.Tensor,
                       embeds: torch.Tensor, pooled: torch.Tensor, mask: torch.Tensor, generator: torch.Generator,
                       schedule: FlowSchedule, logit_mean: float = 0.0, logit_std: float = 1.0,
                       noise_generator: torch.Generator | None = None, start: FlowStart | None = None) -> torch.Tensor:
    """Flow-matching loss of one batch; σ drawn from `generator` on the CPU, ε too (device independent) unless
    `noise_generator` is given: then ε is drawn on that generator's device (fast, device dependent).

    The flow runs from `start` (z_T = α·ε + β·z_clean, default pure noise) to the degraded latent; the pure-noise
    start uses ε itself, so its loss is diffusers' to the bit."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    device = target_latents.device
    x0 = target_latents.float()
    sigmas, timesteps = schedule.draw(x0.shape[0], generator, logit_mean, logit_std)
    if noise_generator is None:
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
    prediction = model(
        hidden_states=noisy, encoder_hidden_states=embeds, pooled_projections=pooled,
        timestep=timesteps.to(device), head_mask=mask, clean_latents=clean_latents, return_dict=False,
    )[0]
    weighting = compute_loss_weighting_for_sd3(WEIGHTING_SCHEME, sigmas=sigma)
    error = weighting.float() * (prediction.float() - (source - x0)) ** 2
    return error.reshape(x0.shape[0], -1).mean(dim=1).mean()


def batch_conditioning(ratios: torch.Tensor, dropped: torch.Tensor, classes: Sequence[str],
                       partition: Sequence[Sequence[int]]) -> tuple[list[str], torch.Tensor]:
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
    """Pixels in [-1, 1] -> SD3 latents (docs/METHOD.md §5), optionally cached by exact pixel content."""

    def __init__(self, vae: torch.nn.Module, device: torch.device, cache: bool = False):
        self.vae, self.device, self.cache = vae, device, {} if cache else None
        self.hits = self.misses = 0

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mode()
        return ((latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor).float()

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            return self._encode(pixels)
        rows = []
        for image in pixels:
            key = hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=16).digest()
            latent = self.cache.get(key)
            if latent is None:
                self.misses += 1
                latent = self.cache[key] = self._encode(image[None])[0].cpu()
            else:
                self.hits += 1
            rows.append(latent)
        return torch.stack(rows).to(self.device)

    def pair(self, clean: torch.Tensor, degraded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean latents, degraded latents); one VAE call for both halves when not caching."""
        if self.cache is not None:
            return self(clean), self(degraded)
        latents = self(torch.cat([clean, degraded]))
        return latents[: len(clean)], latents[len(clean):]


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under OUT/checkpoints, oldest first (a folder counts once its state file exists)."""
    folder = Path(out_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The `trainer_state.json` of a checkpoint folder; errors name the file."""
    path = Path(checkpoint) / STATE_NAME
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise TrainError(f"{path}: not a readable mdsd3 training checkpoint ({error})") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("step"), int):
        raise TrainError(f"{path}: not an mdsd3 training state file")
    return state


def resolve_resume(out_dir: Path, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint to resume from: None (fresh start), `latest` (newest in OUT/checkpoints, or None when
    there is none yet) or a checkpoint folder. A fresh start into a folder with checkpoints is refused."""
    existing = list_checkpoints(out_dir)
    if resume is None:
        if existing:
            raise TrainError(f"{Path(out_dir) / CHECKPOINTS} already holds checkpoints (newest: {existing[-1][1].name}); "
                             "pass --resume latest to continue that run, or choose another output.dir")
        return None
    if str(resume) == "latest":
        return existing[-1][1] if existing else None
    path = Path(resume).expanduser().absolute()
    if not path.is_dir():
        raise TrainError(f"--resume {resume}: checkpoint folder not found: {path}")
    read_state(path)
    return path


# ---------------------------------------------------------------------------------------------- signals, summary


TRAIN_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""SIGTERM/SIGINT (preemption, Ctrl-C) and SIGUSR1 (SLURM's time-limit warning): finish the current optimizer
step, save a checkpoint, exit non-zero."""


@dataclass
class TrainSummary:
    """What one `mdsd3 train` process did."""

    out_dir: Path
    total_steps: int
    start_step: int = 0
    end_step: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    elapsed_s: float = 0.0
    stopped_by: str | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    checkpoint: Path | None = None
    adapter_dir: Path | None = None
    previews: int = 0

    @property
    def steps_done(self) -> int:
        return self.end_step - self.start_step

    @property
    def steps_per_s(self) -> float:
        return self.steps_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.stopped_by) if self.stopped_by else 0

    def table(self) -> Table:
        table = Table(title="mdsd3 train", show_header=False)
        fmt = lambda value: "-" if value is None else f"{value:.4f}"  # noqa: E731
        rows = [
            ("steps", f"{self.end_step}/{self.total_steps}" + (f" (resumed at {self.start_step})" if self.start_step else "")),
            ("loss first / last", f"{fmt(self.first_loss)} / {fmt(self.last_loss)}"),
            ("steps/s (this process)", f"{self.steps_per_s:.2f}"),
            ("elapsed", f"{self.elapsed_s:.1f} s"),
            ("pairs skipped", ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"),
            ("last checkpoint", escape(str(self.checkpoint or "-"))),
            ("adapter", escape(str(self.adapter_dir or "- (not finished)"))),
        ]
        if self.stopped_by:
            rows.append(("stopped by", f"{self.stopped_by} (rerun with --resume latest to continue)"))
        for name, value in rows:
            table.add_row(name, value)
        return table


def describe_training(recipe: TrainRecipe, dataset: PairedDataset) -> Table:
    """What a training run would do, for `mdsd3 check`: classes, pairs per dataset, schedule, output."""
    train = recipe.train
    table = Table(title="training plan", show_header=False)
    rows = [
        ("classes", ", ".join(recipe.classes)), ("base", recipe.model.base),
        ("adapter", str(recipe.model.adapter or "fresh (untrained)")),
        ("pairs", f"{len(dataset.pairs)}\n{dataset.summary()}"),
        ("steps", f"{train.steps} x batch {train.batch_size} x accumulation {train.grad_accum}"),
        ("start", f"z_T = alpha·noise + beta·clean latent: {train.start.describe()}"),
        ("output", str(recipe.output.dir)),
    ]
    for name, value in rows:
        table.add_row(name, escape(value))
    return table


# ---------------------------------------------------------------------------------------------- previews


@dataclass(frozen=True)
class PreviewSettings:
    """How preview grids are sampled: few steps on a fixed batch of up to `images` pairs' clean images, from the
    start the run trains for (`train.start`) unless `start` is given."""

    images: int = 4
    steps: int = 12
    guidance: float = 4.0
    start: FlowStart | None = None
    seed: int = 1234


def preview_columns(classes: Sequence[str]) -> list[tuple[str, dict[str, float]]]:
    """(label, ratios) of each generated column: every class alone, then all of them together."""
    columns = [(name, {name: 1.0}) for name in classes]
    if len(classes) > 1:
        columns.append(("+".join(classes), {name: 1.0 for name in classes}))
    return columns


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def preview_pixels(dataset: PairedDataset, count: int) -> torch.Tensor:
    """Centre crops of up to `count` pairs spread over the dataset (distinct clean images), uint8 [B, R, R, 3]."""
    chosen, seen = [], set()
    for index in np.linspace(0, len(dataset.pairs) - 1, num=min(len(dataset.pairs), 4 * count)).round().astype(int):
        pair = dataset.pairs[int(index)]
        if pair.clean in seen:
            continue
        try:
            sample = dataset.load(Draw(int(index), identity=False, flip=False, crop_x=0.5, crop_y=0.5))
        except Exception:  # an unusable pair is simply not previewed  # noqa: BLE001
            continue
        seen.add(pair.clean)
        chosen.append(sample["clean"])
        if len(chosen) == count:
            break
    if not chosen:
        return torch.empty(0, dataset.data.resolution, dataset.data.resolution, 3, dtype=torch.uint8)
    return _to_uint8(torch.stack(chosen))


def render_preview(sampler: MDSD3Sampler, pixels: torch.Tensor, classes: Sequence[str],
                   settings: PreviewSettings) -> "Image.Image":
    """A grid: one row per image, columns clean | each class | all classes, labelled on top."""
    from PIL import Image, ImageDraw

    start = settings.start or sampler.adapter.start
    columns = [("clean", pixels.numpy())]
    for label, ratios in preview_columns(classes):
        requests = [SampleRequest(ratios, settings.seed + row, start.alpha, start.beta) for row in range(len(pixels))]
        columns.append((label, sampler.generate(pixels, requests, settings.steps, settings.guidance)))
    rows, size = len(pixels), pixels.shape[1]
    header = 14
    grid = Image.new("RGB", (size * len(columns), header + size * rows), "white")
    draw = ImageDraw.Draw(grid)
    for col, (label, images) in enumerate(columns):
        draw.text((col * size + 3, 1), label, fill="black")
        for row in range(rows):
            grid.paste(Image.fromarray(images[row]), (col * size, header + row * size))
    return grid


# ---------------------------------------------------------------------------------------------- the trainer


def resolve_precision(recipe: TrainRecipe, device: torch.device) -> tuple[str, torch.dtype]:
    """(accelerate mixed_precision, dtype of the frozen weights). CPU default: fp32, no autocast."""
    mixed = recipe.train.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    natural = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed]
    if recipe.model.dtype == "auto":
        return mixed, natural
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[recipe.model.dtype]
    if mixed == "no" and dtype != torch.float32:
        raise TrainError(f"model.dtype {recipe.model.dtype} needs train.mixed_precision bf16 or fp16 (low-precision "
                         "frozen weights need autocast); use model.dtype: float32 or auto")
    return mixed, dtype


def check_recipe(recipe: TrainRecipe) -> None:
    """Problems that are visible without data or models."""
    if recipe.data.cache_latents and recipe.data.random_crop:
        raise TrainError("data.cache_latents needs data.random_crop: false (with random crops no two samples share "
                         "pixels, so cached latents would never be reused)")
    if recipe.train.trainable == "lora_only" and recipe.train.lora_rank == 0:
        raise TrainError("train.trainable lora_only needs train.lora_rank > 0")


class _NoProgress:
    def __enter__(self) -> "_NoProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, count: int = 1) -> None:
        return None


class Trainer:
    """One training run. `Trainer(recipe)` checks the recipe and discovers the data (no model loads), `setup()`
    loads models and resumes, `run()` trains and returns a `TrainSummary`.

    `resume`: None (fresh; refused when OUT already has checkpoints), "latest" or a checkpoint folder.
    """

    def __init__(self, recipe: TrainRecipe, resume: str | os.PathLike | None = None,
                 console: rich.console.Console | None = None,
                 preview: PreviewSettings | None = None):
        self.recipe = recipe
        self.out = Path(recipe.output.dir)
        self.console = console or Console(stderr=True)
        self.preview_settings = preview or PreviewSettings()
        check_recipe(recipe)
        self.dataset = build_dataset(recipe)  # before any model: an empty dataset fails here
        self.resume_from = resolve_resume(self.out, resume)
        self.resume_state = read_state(self.resume_from) if self.resume_from else None
        if self.resume_state is not None:
            self._check_resume_state(self.resume_state)
        self.classes = list(recipe.classes)
        self.start_step = self.resume_state["step"] if self.resume_state else 0
        self._ready = False

    # -- setup --------------------------------------------------------------------------------------------------
    def _check_resume_state(self, state: dict[str, Any]) -> None:
        where = self.resume_from / STATE_NAME
        if state.get("classes") != list(self.recipe.classes):
            raise TrainError(f"{where}: the checkpoint was trained for classes {state.get('classes')}, "
                             f"the recipe has {list(self.recipe.classes)}")
        if state.get("trainable") != self.recipe.train.trainable:
            raise TrainError(f"{where}: the checkpoint trained the {state.get('trainable')!r} set; "
                             f"set train.trainable={state.get('trainable')} to resume it")

    def _print(self, text: str) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            self.console.print(escape(text), highlight=False)

    accelerator = None

    def setup(self) -> None:
        """Accelerator, prompt embeddings (text encoders loaded once, then freed), base + adapter, optimizer,
        LR schedule, checkpoint hooks, and the resumed state."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration
        from diffusers.optimization import get_scheduler
        from safetensors.torch import load_file

        recipe, train = self.recipe, self.recipe.train
        wanted = recipe.device()
        mixed, weight_dtype = resolve_precision(recipe, wanted)
        accelerator = Accelerator(
            gradient_accumulation_steps=train.grad_accum, mixed_precision=mixed, cpu=wanted.type == "cpu",
            project_config=ProjectConfiguration(project_dir=str(self.out)),
        )
        self.accelerator = accelerator
        self.device = accelerator.device
        self.weight_dtype = weight_dtype
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        if accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            if self._output_lock is None:  # one training process per OUT, until `run` returns
                self._output_lock = OutputLock(self.out, "train", "training").__enter__()
            for stale in (self.out / CHECKPOINTS).glob(".tmp-*") if (self.out / CHECKPOINTS).is_dir() else ():
                shutil.rmtree(stale, ignore_errors=True)
        self._print(f"data: {len(self.dataset.pairs)} pairs\n{self.dataset.summary()}")

        # Prompt embeddings first, so the text encoders are gone before the transformer loads.
        source = recipe.model.base
        prompts = all_prompts(self.classes)
        with accelerator.main_process_first():
            embeddings = load_prompt_embeddings(source, fingerprint_base(source), prompts, recipe.model.prompt_cache,
                                                self.device, weight_dtype)
        self.prompt_embeddings = embeddings
        self.prompts = PromptTable(embeddings, self.device)

        base = load_base(source, dtype=weight_dtype, device=self.device)
        base.vae.requires_grad_(False)
        self.base = base
        model, config = self._build_model(base)  # fresh LoRA weights are seeded: the same in every process
        self.adapter_config = config
        self.trainable = set_trainable(model, train.trainable)
        upcast_trainable(model)
        if recipe.model.adapter is not None:  # exact fp32 values of a continued adapter (build_model rounds them)
            tensors = load_file(str(Path(recipe.model.adapter) / WEIGHTS_NAME))
            model.load_state_dict({k: v for k, v in tensors.items()}, strict=False)
        if train.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        frozen = describe_parameters(model)["base"]
        trained = describe_parameters(model, trainable_only=True)
        parts = " + ".join(f"{PARAMETER_GROUPS[name]} {count:,}" for name, count in trained.items() if count)
        self._print(f"model: base {source} ({base.fingerprint}), {frozen:,} frozen base parameters; "
                    f"training {sum(trained.values()):,} ({train.trainable}: {parts}); device {self.device}, "
                    f"precision {mixed}, {self.world_size} process(es)")

        optimizer = torch.optim.AdamW(self.trainable, lr=train.lr, weight_decay=train.weight_decay)
        # accelerate steps a prepared scheduler once per process per optimizer step (diffusers' scripts scale too).
        lr_scheduler = get_scheduler("constant_with_warmup", optimizer,
                                     num_warmup_steps=train.warmup_steps * self.world_size,
                                     num_training_steps=train.steps * self.world_size)
        self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
        self.unwrapped: MDSD3Transformer = accelerator.unwrap_model(self.model)
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

        self.schedule = FlowSchedule.from_base(base)
        self.encoder = LatentEncoder(base.vae, self.device, cache=recipe.data.cache_latents)
        self.partition = config.head_partition
        self.elapsed_before = 0.0
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.last_saved = -1
        self.last_checkpoint: Path | None = None
        if self.resume_from is not None:
            accelerator.load_state(str(self.resume_from))
            state = self.resume_state
            self.elapsed_before = float(state.get("elapsed_s", 0.0))
            self.first_loss, self.last_loss = state.get("first_loss"), state.get("last_loss")
            self.last_saved, self.last_checkpoint = self.start_step, self.resume_from
            recorded = {"start": FlowStart().model_dump(), **state}  # older checkpoints trained from pure noise
            changed = [key for key, now in (("batch_size", train.batch_size), ("grad_accum", train.grad_accum),
                                            ("world_size", self.world_size), ("seed", recipe.data.seed),
                                            ("start", train.start.model_dump()))
                       if recorded.get(key) != now]
            self._print(f"resumed from {self.resume_from} at step {self.start_step}"
                        + (f" (changed since: {', '.join(changed)}; the run differs from an uninterrupted one)"
                           if changed else ""))
        elif self.resume_from is None and accelerator.is_main_process:
            (self.out / LOG_NAME).unlink(missing_ok=True)
        if accelerator.is_main_process:
            self._truncate_log(self.start_step)
        self.preview_batch = (preview_pixels(self.dataset, self.preview_settings.images)
                              if recipe.output.preview_every and accelerator.is_main_process else None)
        self._tensorboard = self._open_tensorboard()
        self._ready = True

    def _build_model(self, base: BaseModel) -> tuple[MDSD3Transformer, AdapterConfig]:
        recipe, rank = self.recipe, self.recipe.train.lora_rank
        if recipe.model.adapter is None:
            return build_model(base, config=fresh_adapter_config(base, self.classes, lora_rank=rank))
        model, config = build_model(base, recipe.model.adapter)
        if config.classes != self.classes:
            raise TrainError(f"model.adapter {recipe.model.adapter} was trained for classes {config.classes}; "
                             f"the recipe's classes are {self.classes} (they must be equal, in order)")
        if config.lora_rank == 0 and rank > 0:
            add_lora(model, rank)
            config = config.model_copy(update={"lora_rank": rank, "lora_targets": list(fresh_adapter_config(
                base, self.classes, lora_rank=rank).lora_targets)})
            self._print(f"model.adapter has no LoRA: adding a fresh rank-{rank} LoRA")
        elif config.lora_rank != rank:
            self._print(f"model.adapter has LoRA rank {config.lora_rank}; using it (train.lora_rank {rank} ignored)")
        if config.start != recipe.train.start:
            self._print(f"model.adapter was trained for the start {config.start.describe()}; this run trains it for "
                        f"{recipe.train.start.describe()} (train.start), which its exported config will record")
        return model, config

    def _open_tensorboard(self):
        if not self.accelerator.is_main_process or importlib.util.find_spec("tensorboard") is None:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out / "tensorboard"), purge_step=self.start_step + 1 if self.start_step else None)

    # -- checkpoint hooks ---------------------------------------------------------------------------------------
    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        """Store only the adapter (safetensors) instead of the full model state dict."""
        if self.accelerator.is_main_process:
            save_adapter(self.unwrapped, self._export_config(self._saving_step), Path(output_dir) / ADAPTER_DIR)
        while weights:
            weights.pop()

    def _load_hook(self, models: list, input_dir: str) -> None:
        """Load the adapter tensors ourselves (exact fp32), so accelerate looks for no model file."""
        from safetensors.torch import load_file

        while models:
            models.pop()
        folder = Path(input_dir) / ADAPTER_DIR
        try:
            config = read_adapter_config(folder)
            tensors = load_file(str(folder / WEIGHTS_NAME))
        except (AdapterError, OSError) as error:
            raise TrainError(f"checkpoint {input_dir}: {error}") from error
        if config.base_fingerprint != self.base.fingerprint:
            raise TrainError(f"checkpoint {input_dir} was trained on base {config.base_fingerprint}, "
                             f"this recipe's base is {self.base.fingerprint}")
        from mdsd3_cli.model.weights import adapter_state_dict

        expected = set(adapter_state_dict(self.unwrapped))
        if set(tensors) != expected:
            raise TrainError(f"checkpoint {input_dir}: adapter tensors do not fit this model (LoRA rank or trainable "
                             f"set changed?): missing {sorted(expected - set(tensors))[:3]}, "
                             f"unexpected {sorted(set(tensors) - expected)[:3]}")
        self.unwrapped.load_state_dict(tensors, strict=False)

    _saving_step = 0

    def _export_config(self, step: int) -> AdapterConfig:
        recipe = self.recipe
        training = {
            "tool": f"mdsd3 {__version__}", "steps": step, "trainable": recipe.train.trainable,
            "first_loss": self.first_loss, "last_loss": self.last_loss,
            "recipe": recipe.model_dump(mode="json"),
        }
        return self.adapter_config.model_copy(update={"training": training, "start": recipe.train.start})

    def _state(self, step: int, elapsed: float) -> dict[str, Any]:
        recipe = self.recipe
        return {
            "format": STATE_FORMAT, "version": 1, "step": step, "data_step": step * recipe.train.grad_accum,
            "total_steps": recipe.train.steps, "batch_size": recipe.train.batch_size,
            "grad_accum": recipe.train.grad_accum, "world_size": self.world_size, "seed": recipe.data.seed,
            "start": recipe.train.start.model_dump(),
            "classes": self.classes, "trainable": recipe.train.trainable, "lora_rank": self.adapter_config.lora_rank,
            "base_fingerprint": self.base.fingerprint, "elapsed_s": elapsed,
            "first_loss": self.first_loss, "last_loss": self.last_loss, "tool": f"mdsd3 {__version__}",
        }

    def save_checkpoint(self, step: int, elapsed: float) -> Path:
        """OUT/checkpoints/step-N: accelerate state + adapter + trainer_state.json, written under a temporary
        name and renamed when complete; then all but the newest `keep_checkpoints` are deleted."""
        accelerator = self.accelerator
        folder = self.out / CHECKPOINTS
        final = folder / checkpoint_name(step)
        tmp = folder / f".tmp-{final.name}"
        if accelerator.is_main_process:
            ensure_folder(folder, self.out)
            fresh_folder(tmp)
        accelerator.wait_for_everyone()
        self._saving_step = step
        try:
            accelerator.save_state(str(tmp))
        except RuntimeError as error:  # torch.save reports a full disk as "[enforce fail ...] unexpected pos"
            shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(folder).free
            raise TrainError(f"cannot write checkpoint {final} ({str(error).splitlines()[0]}); {free / 1e6:,.0f} MB "
                             "free on that disk: free some space, then rerun with --resume latest") from None
        if accelerator.is_main_process:
            atomic_write(tmp / STATE_NAME, (json.dumps(self._state(step, elapsed), indent=2) + "\n").encode())
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            trash = None
            if os.path.lexists(final):  # re-saving a step (resumed from an older checkpoint): swap, then delete
                trash = folder / f".tmp-old-{final.name}"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
            os.replace(tmp, final)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
            for _, old in list_checkpoints(self.out)[: -self.recipe.output.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        self.last_saved, self.last_checkpoint = step, final
        return final

    def export_adapter(self, step: int) -> Path:
        """OUT/adapter: the trained adapter, loadable by `weights.build_model` and `mdsd3 generate`."""
        target = self.out / ADAPTER_DIR
        if self.accelerator.is_main_process:
            save_adapter(self.unwrapped, self._export_config(step), target, root=self.out)
        self.accelerator.wait_for_everyone()
        return target

    # -- logging, previews ----------------------------------------------------------------------------------------
    def _truncate_log(self, step: int) -> None:
        """Drop log lines past the resumed step (written by the interrupted run after its last checkpoint)."""
        path = self.out / LOG_NAME
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        atomic_write(path, "".join(f"{line}\n" for line in kept).encode(), root=self.out)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        with open_append(self.out / LOG_NAME, self.out) as handle:
            handle.write((json.dumps(record) + "\n").encode())
        if self._tensorboard is not None:
            for key in ("loss", "lr", "grad_norm"):
                if record.get(key) is not None:
                    self._tensorboard.add_scalar(f"train/{key}", record[key], record["step"])

    def write_preview(self, step: int) -> Path | None:
        """OUT/previews/step-N.png (main process; the others wait)."""
        path = None
        if self.accelerator.is_main_process and self.preview_batch is not None and len(self.preview_batch):
            sampler = MDSD3Sampler(self.base, self.unwrapped, self._export_config(step), self.prompt_embeddings)
            self.unwrapped.eval()
            try:
                with torch.no_grad(), self.accelerator.autocast():
                    grid = render_preview(sampler, self.preview_batch, self.classes, self.preview_settings)
            finally:
                self.unwrapped.train()
            path = self.out / PREVIEWS / f"{checkpoint_name(step)}.png"
            atomic_write(path, lambda file: grid.save(file, format="PNG", compress_level=1), root=self.out)
        self.accelerator.wait_for_everyone()
        return path

    # -- one step -----------------------------------------------------------------------------------------------
    def compute_loss(self, data_step: int, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The loss of this rank's micro batch at `data_step` (forward only)."""
        seed = self.recipe.data.seed
        size = batch["clean"].shape[0]
        dropped = condition_drop_mask(seed, data_step, size, self.recipe.data.condition_drop, self.rank)
        prompts, mask = batch_conditioning(batch["ratios"], dropped, self.classes, self.partition)
        embeds, pooled = self.prompts.batch(prompts)
        clean, target = self.encoder.pair(batch["clean"], batch["degraded"])
        return flow_matching_loss(self.model, clean, target, embeds, pooled, mask.to(self.device),
                                  step_generator(seed, data_step, self.rank), self.schedule,
                                  self.recipe.train.logit_mean, self.recipe.train.logit_std, start=self.recipe.train.start)

    def _batches(self, start: int, end: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        ga = self.recipe.train.grad_accum
        return self.dataset.batches(start * ga, end * ga, self.recipe.train.batch_size, self.rank, self.world_size,
                                    pin_memory=self.device.type == "cuda")

    def _agree_on_stop(self, stop: StopRequest) -> str | None:
        """The signal that stops this step, agreed by all ranks (a rank may see it a step later than another)."""
        local = stop.signal.value if stop.signal is not None else 0
        if self.world_size == 1:
            return stop.signal.name if stop.signal is not None else None
        flags = self.accelerator.gather(torch.tensor([local], device=self.device, dtype=torch.int64))
        code = int(flags.max().item())
        return signal.Signals(code).name if code else None

    # -- the loop -----------------------------------------------------------------------------------------------
    _output_lock: OutputLock | None = None

    def run(self) -> TrainSummary:
        """Train from the start (or resumed) step to `train.steps`; checkpoints, previews, log, adapter export."""
        try:
            return self._run()
        finally:
            if self._output_lock is not None:
                self._output_lock.__exit__(None, None, None)
                self._output_lock = None

    def _run(self) -> TrainSummary:
        if not self._ready:
            self.setup()
        accelerator, recipe = self.accelerator, self.recipe
        out, total, ga = recipe.output, recipe.train.steps, recipe.train.grad_accum
        summary = TrainSummary(self.out, total, self.start_step, self.start_step,
                               self.first_loss, self.last_loss, checkpoint=self.last_checkpoint)
        step = self.start_step
        started = time.perf_counter()
        elapsed = lambda: self.elapsed_before + time.perf_counter() - started  # noqa: E731
        window: list[float] = []
        micro_losses: list[torch.Tensor] = []
        grad_norm: float | None = None
        progress = (RunProgress(max(total - step, 0), "train", unit="steps", console=self.console)
                    if accelerator.is_main_process else _NoProgress())
        stop_signal = None
        with StopRequest(TRAIN_STOP_SIGNALS) as stop, progress:
            batches = self._batches(step, total) if step < total else iter(())
            try:
                for data_step, batch in batches:
                    with accelerator.accumulate(self.model):
                        loss = self.compute_loss(data_step, batch)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            norm = accelerator.clip_grad_norm_(self.trainable, recipe.train.max_grad_norm)
                            grad_norm = float(norm) if norm is not None else None
                        self.optimizer.step()
                        self.lr_scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    micro_losses.append(loss.detach())
                    if data_step % ga != ga - 1:
                        continue
                    step += 1
                    step_loss = torch.stack(micro_losses).mean()
                    micro_losses.clear()
                    if self.world_size > 1:
                        step_loss = accelerator.gather(step_loss[None]).mean()
                    value = float(step_loss)
                    if not math.isfinite(value):
                        raise FloatingPointError(f"loss is {value} at step {step}; lower train.lr or check the data")
                    self.first_loss = value if self.first_loss is None else self.first_loss
                    self.last_loss = value
                    window.append(value)
                    progress.advance()
                    if step % out.log_every == 0 or step == total:
                        self._log({"step": step, "loss": sum(window) / len(window), "lr": self.lr_scheduler.get_last_lr()[0],
                                   "grad_norm": grad_norm, "elapsed": round(elapsed(), 3)})
                        window.clear()
                    stop_signal = self._agree_on_stop(stop)
                    if step % out.checkpoint_every == 0 or step == total or stop_signal:
                        summary.checkpoint = self.save_checkpoint(step, elapsed())
                    if out.preview_every and (step % out.preview_every == 0 or step == total) and not stop_signal:
                        self.write_preview(step)
                        summary.previews += 1
                    if stop_signal:
                        break
            finally:
                if hasattr(batches, "close"):
                    batches.close()
        if stop_signal and step > self.last_saved:
            summary.checkpoint = self.save_checkpoint(step, elapsed())
        summary.end_step = step
        summary.first_loss, summary.last_loss = self.first_loss, self.last_loss
        summary.elapsed_s = time.perf_counter() - started
        summary.stopped_by = stop_signal
        summary.skipped = self.dataset.report.counts()
        if stop_signal is None:
            if step > self.last_saved:
                summary.checkpoint = self.save_checkpoint(step, elapsed())
            summary.adapter_dir = self.export_adapter(step)
        if self._tensorboard is not None:
            self._tensorboard.close()
        accelerator.end_training()
        return summary


def run_train(recipe: TrainRecipe, resume: str | os.PathLike | None = None,
              console: rich.console.Console | None = None, preview: PreviewSettings | None = None) -> TrainSummary:
    """Train the adapter a recipe describes; see `Trainer`."""
    return Trainer(recipe, resume, console, preview).run()


__all__ = [
    "TRAINABLE_SETS", "FlowSchedule", "LatentEncoder", "PreviewSettings", "PromptTable", "TrainError",
    "TrainSummary", "Trainer", "batch_conditioning", "check_recipe", "flow_matching_loss", "is_trainable",
    "list_checkpoints", "read_state", "resolve_precision", "resolve_resume", "run_train", "set_trainable",
    "step_generator", "upcast_trainable",
]
