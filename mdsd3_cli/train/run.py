"""`mdsd3 train`: learn an MDSD3 adapter from clean/degraded pairs (docs/METHOD.md §4).

One process or many (`accelerate launch` / torchrun); the loop is accelerate's: `accumulate`, `backward`,
`clip_grad_norm_`, `save_state` / `load_state`. What a step computes is in `train.step`, the data in
`train.data`, checkpoints in `train.checkpoints`, previews in `train.previews`, the log in `train.log`, the
summary in `train.summary`.

Determinism: the data of data step d (= optimizer step · grad_accum + micro step) is a pure function of
(data.seed, d, slot) (see `train.data`); ε and σ come from a generator seeded by (data.seed, d, rank); the
condition drop from `condition_drop_mask(data.seed, d, ...)`. Nothing reads a global RNG, so a resumed run
repeats the uninterrupted run's losses exactly (on the CPU; GPU kernels may differ in the last bits).

Precision: frozen base (and VAE) in bf16 on GPU, trainable parameters in fp32, bf16 autocast (accelerate's
mixed precision); on the CPU everything fp32 without autocast.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import rich.console
import torch
from rich.markup import escape

from mdsd3_cli.dataset.ownership import LOCKS, OutputLock
from mdsd3_cli.model.adapter import WEIGHTS_NAME, AdapterConfig, FlowStart
from mdsd3_cli.model.heads import all_prompts
from mdsd3_cli.model.prompts import load_prompt_embeddings
from mdsd3_cli.model.sampler import MDSD3Sampler
from mdsd3_cli.model.transformer import MDSD3Transformer
from mdsd3_cli.model.weights import (
    PARAMETER_GROUPS,
    BaseModel,
    add_lora,
    build_model,
    describe_parameters,
    fingerprint_base,
    fresh_adapter_config,
    load_base,
    save_adapter,
)
from mdsd3_cli.recipe.train import Mdsd3OutputDataset, PairedFoldersDataset, TrainRecipe
from mdsd3_cli.train.checkpoints import (
    ADAPTER_DIR,
    CHECKPOINTS,
    STATE_FORMAT,
    STATE_NAME,
    check_resume_state,
    checkpoint_name,
    export_config,
    load_checkpoint_adapter,
    read_state,
    resolve_resume,
    write_checkpoint,
)
from mdsd3_cli.train.data import build_dataset, condition_drop_mask
from mdsd3_cli.train.errors import TrainError
from mdsd3_cli.train.log import LOG_NAME, append_log, open_tensorboard, truncate_log
from mdsd3_cli.train.previews import PREVIEWS, PreviewSettings, preview_pixels, render_preview
from mdsd3_cli.train.step import (
    FlowSchedule,
    LatentEncoder,
    PromptTable,
    batch_conditioning,
    flow_matching_loss,
    set_trainable,
    step_generator,
    upcast_trainable,
)
from mdsd3_cli.train.summary import TrainSummary
from mdsd3_cli.util.atomic import atomic_write
from mdsd3_cli.util.progress import Console, RunProgress
from mdsd3_cli.util.runtime import StopRequest
from mdsd3_cli.util.version import __version__

if TYPE_CHECKING:
    from accelerate import Accelerator


TRAIN_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""SIGTERM/SIGINT (preemption, Ctrl-C) and SIGUSR1 (SLURM's time-limit warning): finish the current optimizer
step, save a checkpoint, exit non-zero."""


def agree_on_stop(stop: StopRequest, accelerator: Accelerator) -> str | None:
    """The signal that stops this step, agreed by all ranks (a rank may see it a step later than another)."""
    local = stop.signal.value if stop.signal is not None else 0
    if accelerator.num_processes == 1:
        return stop.signal.name if stop.signal is not None else None
    flags = accelerator.gather(torch.tensor([local], device=accelerator.device, dtype=torch.int64))
    code = int(flags.max().item())
    return signal.Signals(code).name if code else None


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
        raise TrainError(
            f"model.dtype {recipe.model.dtype} needs train.mixed_precision bf16 or fp16 (low-precision "
            "frozen weights need autocast); use model.dtype: float32 or auto"
        )
    return mixed, dtype


def check_recipe(recipe: TrainRecipe) -> None:
    """Problems that are visible without data or models."""
    if recipe.data.cache_latents and recipe.data.random_crop:
        raise TrainError(
            "data.cache_latents needs data.random_crop: false (with random crops no two samples share "
            "pixels, so cached latents would never be reused)"
        )
    if recipe.train.trainable == "lora_only" and recipe.train.lora_rank == 0:
        raise TrainError("train.trainable lora_only needs train.lora_rank > 0")


TRAIN_OUTPUT_MARKERS = (LOG_NAME, CHECKPOINTS, ADAPTER_DIR)
"""What makes a folder a training output: a non-empty OUT holding none of these is someone else's."""


def check_output_folder(recipe: TrainRecipe) -> None:
    """TrainError when output.dir is, lies inside or holds a folder that a training dataset scans (its previews
    would become training data), or is a non-empty folder training did not write (none of TRAIN_OUTPUT_MARKERS)."""
    out = Path(recipe.output.dir).resolve()
    for spec in recipe.datasets:
        if isinstance(spec, PairedFoldersDataset):
            folders = [spec.clean, spec.degraded]
        elif isinstance(spec, Mdsd3OutputDataset):
            folders = [spec.dir]
        else:
            continue  # a pair list names its files: nothing written beside it becomes data
        for folder in folders:
            data = Path(folder).resolve()
            if out.is_relative_to(data) or data.is_relative_to(out):
                raise TrainError(
                    f"{recipe.source}: output.dir {out} overlaps the training data {folder} (dataset "
                    f"{spec.name!r}); choose an output folder outside the datasets"
                )
    if out.exists() and not out.is_dir():
        raise TrainError(f"{recipe.source}: output.dir {out} is not a folder")
    entries = set(os.listdir(out)) - {LOCKS} if out.is_dir() else set()
    if entries and not entries & set(TRAIN_OUTPUT_MARKERS):
        shown = ", ".join(sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
        raise TrainError(
            f"{recipe.source}: output.dir {out} is a non-empty folder that training did not write "
            f"(it holds {shown}); choose a new or empty folder"
        )


class _NoProgress:
    """The progress display of the processes other than the main one: nothing."""

    def __enter__(self) -> _NoProgress:
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

    def __init__(
        self,
        recipe: TrainRecipe,
        resume: str | os.PathLike | None = None,
        console: rich.console.Console | None = None,
        preview: PreviewSettings | None = None,
    ):
        self.recipe = recipe
        self.out = Path(recipe.output.dir)
        self.console = console or Console(stderr=True)
        self.preview_settings = preview or PreviewSettings()
        check_recipe(recipe)
        check_output_folder(recipe)
        self.dataset = build_dataset(recipe)  # before any model: an empty dataset fails here
        self.resume_from = resolve_resume(self.out, resume)
        self.resume_state = read_state(self.resume_from) if self.resume_from else None
        if self.resume_state is not None:
            check_resume_state(self.resume_state, self.resume_from / STATE_NAME, recipe)
        self.classes = list(recipe.classes)
        self.start_step = self.resume_state["step"] if self.resume_state else 0
        self._ready = False

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
            gradient_accumulation_steps=train.grad_accum,
            mixed_precision=mixed,
            cpu=wanted.type == "cpu",
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
            embeddings = load_prompt_embeddings(
                source, fingerprint_base(source), prompts, recipe.model.prompt_cache, self.device, weight_dtype
            )
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
        self._print(
            f"model: base {source} ({base.fingerprint}), {frozen:,} frozen base parameters; "
            f"training {sum(trained.values()):,} ({train.trainable}: {parts}); device {self.device}, "
            f"precision {mixed}, {self.world_size} process(es)"
        )

        optimizer = torch.optim.AdamW(self.trainable, lr=train.lr, weight_decay=train.weight_decay)
        # accelerate steps a prepared scheduler once per process per optimizer step (diffusers' scripts scale too).
        lr_scheduler = get_scheduler(
            "constant_with_warmup",
            optimizer,
            num_warmup_steps=train.warmup_steps * self.world_size,
            num_training_steps=train.steps * self.world_size,
        )
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
            changed = [
                key
                for key, now in (
                    ("batch_size", train.batch_size),
                    ("grad_accum", train.grad_accum),
                    ("world_size", self.world_size),
                    ("seed", recipe.data.seed),
                    ("start", train.start.model_dump()),
                )
                if recorded.get(key) != now
            ]
            self._print(
                f"resumed from {self.resume_from} at step {self.start_step}"
                + (
                    f" (changed since: {', '.join(changed)}; the run differs from an uninterrupted one)"
                    if changed
                    else ""
                )
            )
        elif self.resume_from is None and accelerator.is_main_process:
            (self.out / LOG_NAME).unlink(missing_ok=True)
        if accelerator.is_main_process:
            truncate_log(self.out, self.start_step)
        self.preview_batch = (
            preview_pixels(self.dataset, self.preview_settings.images)
            if recipe.output.preview_every and accelerator.is_main_process
            else None
        )
        self._tensorboard = open_tensorboard(self.out, self.start_step) if accelerator.is_main_process else None
        self._ready = True

    def _build_model(self, base: BaseModel) -> tuple[MDSD3Transformer, AdapterConfig]:
        recipe, rank = self.recipe, self.recipe.train.lora_rank
        if recipe.model.adapter is None:
            return build_model(base, config=fresh_adapter_config(base, self.classes, lora_rank=rank))
        model, config = build_model(base, recipe.model.adapter)
        if config.classes != self.classes:
            raise TrainError(
                f"model.adapter {recipe.model.adapter} was trained for classes {config.classes}; "
                f"the recipe's classes are {self.classes} (they must be equal, in order)"
            )
        if config.lora_rank == 0 and rank > 0:
            add_lora(model, rank)
            config = config.model_copy(
                update={
                    "lora_rank": rank,
                    "lora_targets": list(fresh_adapter_config(base, self.classes, lora_rank=rank).lora_targets),
                }
            )
            self._print(f"model.adapter has no LoRA: adding a fresh rank-{rank} LoRA")
        elif config.lora_rank != rank:
            self._print(f"model.adapter has LoRA rank {config.lora_rank}; using it (train.lora_rank {rank} ignored)")
        if config.start != recipe.train.start:
            self._print(
                f"model.adapter was trained for the start {config.start.describe()}; this run trains it for "
                f"{recipe.train.start.describe()} (train.start), which its exported config will record"
            )
        return model, config

    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        """Store only the adapter (safetensors) instead of the full model state dict."""
        if self.accelerator.is_main_process:
            save_adapter(self.unwrapped, self._export_config(self._saving_step), Path(output_dir) / ADAPTER_DIR)
        while weights:
            weights.pop()

    def _load_hook(self, models: list, input_dir: str) -> None:
        """Load the adapter tensors ourselves (exact fp32), so accelerate looks for no model file."""
        while models:
            models.pop()
        load_checkpoint_adapter(self.unwrapped, input_dir, self.base.fingerprint)

    _saving_step = 0

    def _export_config(self, step: int) -> AdapterConfig:
        """The adapter config of this run at `step` (see `checkpoints.export_config`)."""
        return export_config(self.adapter_config, self.recipe, step, self.first_loss, self.last_loss)

    def _state(self, step: int, elapsed: float) -> dict[str, Any]:
        """The trainer_state.json of a checkpoint at `step`: the step, the run's facts and losses."""
        recipe = self.recipe
        return {
            "format": STATE_FORMAT,
            "version": 1,
            "step": step,
            "data_step": step * recipe.train.grad_accum,
            "total_steps": recipe.train.steps,
            "batch_size": recipe.train.batch_size,
            "grad_accum": recipe.train.grad_accum,
            "world_size": self.world_size,
            "seed": recipe.data.seed,
            "start": recipe.train.start.model_dump(),
            "classes": self.classes,
            "trainable": recipe.train.trainable,
            "lora_rank": self.adapter_config.lora_rank,
            "base_fingerprint": self.base.fingerprint,
            "elapsed_s": elapsed,
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "tool": f"mdsd3 {__version__}",
        }

    def save_checkpoint(self, step: int, elapsed: float) -> Path:
        """OUT/checkpoints/step-N (see `checkpoints.write_checkpoint`); every process calls it."""
        self._saving_step = step
        final = write_checkpoint(
            self.accelerator, self.out, step, self._state(step, elapsed), self.recipe.output.keep_checkpoints
        )
        self.last_saved, self.last_checkpoint = step, final
        return final

    def export_adapter(self, step: int) -> Path:
        """OUT/adapter: the trained adapter, loadable by `weights.build_model` and `mdsd3 generate`."""
        target = self.out / ADAPTER_DIR
        if self.accelerator.is_main_process:
            save_adapter(self.unwrapped, self._export_config(step), target, root=self.out)
        self.accelerator.wait_for_everyone()
        return target

    def _log(self, record: dict[str, Any]) -> None:
        """Append one record to the log (main process)."""
        if self.accelerator.is_main_process:
            append_log(self.out, record, self._tensorboard)

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

    def compute_loss(self, data_step: int, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The loss of this rank's micro batch at `data_step` (forward only)."""
        seed = self.recipe.data.seed
        size = batch["clean"].shape[0]
        dropped = condition_drop_mask(seed, data_step, size, self.recipe.data.condition_drop, self.rank)
        prompts, mask = batch_conditioning(batch["ratios"], dropped, self.classes, self.partition)
        embeds, pooled = self.prompts.batch(prompts)
        clean, target = self.encoder.pair(batch["clean"], batch["degraded"])
        return flow_matching_loss(
            self.model,
            clean,
            target,
            embeds,
            pooled,
            mask.to(self.device),
            step_generator(seed, data_step, self.rank),
            self.schedule,
            self.recipe.train.logit_mean,
            self.recipe.train.logit_std,
            start=self.recipe.train.start,
        )

    def _batches(self, start: int, end: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        ga = self.recipe.train.grad_accum
        return self.dataset.batches(
            start * ga,
            end * ga,
            self.recipe.train.batch_size,
            self.rank,
            self.world_size,
            pin_memory=self.device.type == "cuda",
        )

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
        summary = TrainSummary(
            self.out,
            total,
            self.start_step,
            self.start_step,
            self.first_loss,
            self.last_loss,
            checkpoint=self.last_checkpoint,
        )
        step = self.start_step
        started = time.perf_counter()
        elapsed = lambda: self.elapsed_before + time.perf_counter() - started  # noqa: E731
        window: list[float] = []
        micro_losses: list[torch.Tensor] = []
        grad_norm: float | None = None
        progress = (
            RunProgress(max(total - step, 0), "train", unit="steps", console=self.console)
            if accelerator.is_main_process
            else _NoProgress()
        )
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
                        self._log(
                            {
                                "step": step,
                                "loss": sum(window) / len(window),
                                "lr": self.lr_scheduler.get_last_lr()[0],
                                "grad_norm": grad_norm,
                                "elapsed": round(elapsed(), 3),
                            }
                        )
                        window.clear()
                    stop_signal = agree_on_stop(stop, accelerator)
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


def run_train(
    recipe: TrainRecipe,
    resume: str | os.PathLike | None = None,
    console: rich.console.Console | None = None,
    preview: PreviewSettings | None = None,
) -> TrainSummary:
    """Train the adapter a recipe describes; see `Trainer`."""
    return Trainer(recipe, resume, console, preview).run()
