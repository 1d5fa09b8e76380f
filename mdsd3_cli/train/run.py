"""`mdsd3 train`: learn an MDSD3 adapter from clean/degraded pairs (docs/METHOD.md §4).

`plan_training` checks the recipe and finds the data (no model), `open_training` loads everything into one
`TrainState` while the output folder is locked, and `train` is the loop over that state; `run_train` does all
three. One process or many (`accelerate launch` / torchrun); the loop is accelerate's: `accumulate`, `backward`,
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
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import rich.console
import torch
from rich.markup import escape

from mdsd3_cli.dataset.names import LOCKS_FOLDER
from mdsd3_cli.dataset.ownership import OutputLock
from mdsd3_cli.model.adapter import WEIGHTS_NAME, AdapterConfig, FlowStart
from mdsd3_cli.model.heads import all_prompts
from mdsd3_cli.model.prompts import PromptEmbedding, load_prompt_embeddings
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
from mdsd3_cli.train.data import PairedDataset, build_dataset, condition_drop_mask
from mdsd3_cli.train.errors import TrainError
from mdsd3_cli.train.log import LOG_NAME, append_log, open_tensorboard, truncate_log
from mdsd3_cli.train.previews import PREVIEWS, PreviewSettings, preview_pipeline, preview_pixels, render_preview
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
    entries = set(os.listdir(out)) - {LOCKS_FOLDER} if out.is_dir() else set()
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


@dataclass(frozen=True)
class TrainPlan:
    """A checked run before any model loads: the recipe, its data and the checkpoint it resumes (if any)."""

    recipe: TrainRecipe
    dataset: PairedDataset
    resume_from: Path | None = None
    resume_state: dict[str, Any] | None = None

    @property
    def start_step(self) -> int:
        return self.resume_state["step"] if self.resume_state else 0


def plan_training(recipe: TrainRecipe, resume: str | os.PathLike | None = None) -> TrainPlan:
    """Check the recipe, the output folder and the checkpoint to resume, and discover the data; no model loads.

    `resume`: None (fresh; refused when OUT already has checkpoints), "latest" or a checkpoint folder.
    """
    check_recipe(recipe)
    check_output_folder(recipe)
    dataset = build_dataset(recipe)  # before any model: an empty dataset fails here
    resume_from = resolve_resume(Path(recipe.output.dir), resume)
    resume_state = read_state(resume_from) if resume_from else None
    if resume_state is not None:
        check_resume_state(resume_state, resume_from / STATE_NAME, recipe)
    return TrainPlan(recipe, dataset, resume_from, resume_state)


@dataclass
class TrainState:
    """Everything one run holds: loaded by `open_training`, advanced by `train`. The counters' defaults are
    those of a fresh run; a resumed one starts from its checkpoint's."""

    recipe: TrainRecipe
    dataset: PairedDataset
    accelerator: Accelerator
    console: rich.console.Console
    base: BaseModel
    model: torch.nn.Module
    """The transformer as accelerate prepared it (what the loss runs)."""
    unwrapped: MDSD3Transformer
    adapter_config: AdapterConfig
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    prompt_embeddings: dict[str, PromptEmbedding]
    prompts: PromptTable
    schedule: FlowSchedule
    encoder: LatentEncoder
    preview: PreviewSettings = field(default_factory=PreviewSettings)
    preview_batch: torch.Tensor | None = None
    tensorboard: Any = None
    step: int = 0
    elapsed_before: float = 0.0
    first_loss: float | None = None
    last_loss: float | None = None
    last_saved: int = -1
    last_checkpoint: Path | None = None

    @property
    def out(self) -> Path:
        return Path(self.recipe.output.dir)

    @property
    def classes(self) -> list[str]:
        return list(self.recipe.classes)


def _say(accelerator: Accelerator, console: rich.console.Console, text: str) -> None:
    """Print on the main process only."""
    if accelerator.is_main_process:
        console.print(escape(text), highlight=False)


def make_accelerator(recipe: TrainRecipe) -> tuple[Accelerator, str, torch.dtype]:
    """The run's Accelerator, its mixed precision and the dtype of the frozen weights."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    wanted = recipe.device()
    mixed, weight_dtype = resolve_precision(recipe, wanted)
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.train.grad_accum,
        mixed_precision=mixed,
        cpu=wanted.type == "cpu",
        project_config=ProjectConfiguration(project_dir=str(recipe.output.dir)),
    )
    return accelerator, mixed, weight_dtype


@contextmanager
def output_lock(out: Path, accelerator: Accelerator) -> Iterator[None]:
    """OUT made and held by this run until the block ends (the main process's lock: one training process per
    OUT), with the temp folders of checkpoints an earlier run left half-written removed."""
    if not accelerator.is_main_process:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out, "train", "training"):
        for stale in (out / CHECKPOINTS).glob(".tmp-*") if (out / CHECKPOINTS).is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True)
        yield


def load_model(
    recipe: TrainRecipe, base: BaseModel, say: Callable[[str], None]
) -> tuple[MDSD3Transformer, AdapterConfig]:
    """The transformer to train and its config: a fresh adapter, or the recipe's model.adapter (with a fresh
    LoRA when it has none and train.lora_rank asks for one)."""
    classes, rank = list(recipe.classes), recipe.train.lora_rank
    if recipe.model.adapter is None:
        model, config = build_model(base, config=fresh_adapter_config(base, classes, lora_rank=rank))
    else:
        model, config = build_model(base, recipe.model.adapter)
        if config.classes != classes:
            raise TrainError(
                f"model.adapter {recipe.model.adapter} was trained for classes {config.classes}; "
                f"the recipe's classes are {classes} (they must be equal, in order)"
            )
        if config.lora_rank == 0 and rank > 0:
            add_lora(model, rank)
            config = config.model_copy(
                update={
                    "lora_rank": rank,
                    "lora_targets": list(fresh_adapter_config(base, classes, lora_rank=rank).lora_targets),
                }
            )
            say(f"model.adapter has no LoRA: adding a fresh rank-{rank} LoRA")
        elif config.lora_rank != rank:
            say(f"model.adapter has LoRA rank {config.lora_rank}; using it (train.lora_rank {rank} ignored)")
        if config.start != recipe.train.start:
            say(
                f"model.adapter was trained for the start {config.start.describe()}; this run trains it for "
                f"{recipe.train.start.describe()} (train.start), which its exported config will record"
            )
    return model, config


def setup(
    plan: TrainPlan,
    accelerator: Accelerator,
    mixed: str,
    weight_dtype: torch.dtype,
    console: rich.console.Console,
    preview: PreviewSettings,
) -> TrainState:
    """Prompt embeddings (text encoders loaded once, then freed), base + adapter, optimizer, LR schedule and
    checkpoint hooks, as one TrainState at the plan's start step (the resumed checkpoint loaded)."""
    from diffusers.optimization import get_scheduler
    from safetensors.torch import load_file

    recipe, train, device = plan.recipe, plan.recipe.train, accelerator.device
    say = partial(_say, accelerator, console)
    say(f"data: {len(plan.dataset.pairs)} pairs\n{plan.dataset.summary()}")

    # Prompt embeddings first, so the text encoders are gone before the transformer loads.
    source = recipe.model.base
    with accelerator.main_process_first():
        embeddings = load_prompt_embeddings(
            source,
            fingerprint_base(source),
            all_prompts(recipe.classes),
            recipe.model.prompt_cache,
            device,
            weight_dtype,
        )

    base = load_base(source, dtype=weight_dtype, device=device)
    base.vae.requires_grad_(False)
    model, config = load_model(recipe, base, say)  # fresh LoRA weights are seeded: the same in every process
    trainable = set_trainable(model, train.trainable)
    upcast_trainable(model)
    if recipe.model.adapter is not None:  # exact fp32 values of a continued adapter (build_model rounds them)
        model.load_state_dict(load_file(str(Path(recipe.model.adapter) / WEIGHTS_NAME)), strict=False)
    if train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    frozen = describe_parameters(model)["base"]
    trained = describe_parameters(model, trainable_only=True)
    parts = " + ".join(f"{PARAMETER_GROUPS[name]} {count:,}" for name, count in trained.items() if count)
    say(
        f"model: base {source} ({base.fingerprint}), {frozen:,} frozen base parameters; "
        f"training {sum(trained.values()):,} ({train.trainable}: {parts}); device {device}, "
        f"precision {mixed}, {accelerator.num_processes} process(es)"
    )

    optimizer = torch.optim.AdamW(trainable, lr=train.lr, weight_decay=train.weight_decay)
    # accelerate steps a prepared scheduler once per process per optimizer step (diffusers' scripts scale too).
    lr_scheduler = get_scheduler(
        "constant_with_warmup",
        optimizer,
        num_warmup_steps=train.warmup_steps * accelerator.num_processes,
        num_training_steps=train.steps * accelerator.num_processes,
    )
    prepared, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    state = TrainState(
        recipe=recipe,
        dataset=plan.dataset,
        accelerator=accelerator,
        console=console,
        base=base,
        model=prepared,
        unwrapped=accelerator.unwrap_model(prepared),
        adapter_config=config,
        trainable=trainable,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        prompt_embeddings=embeddings,
        prompts=PromptTable(embeddings, device),
        schedule=FlowSchedule.from_base(base),
        encoder=LatentEncoder(base.vae, device, cache=recipe.data.cache_latents),
        preview=preview,
    )
    _register_checkpoint_hooks(state)
    if plan.resume_from is not None:
        _resume(state, plan)
    elif accelerator.is_main_process:
        (state.out / LOG_NAME).unlink(missing_ok=True)
    if accelerator.is_main_process:
        truncate_log(state.out, state.step)
        if recipe.output.preview_every:
            state.preview_batch = preview_pixels(plan.dataset, preview.images)
        state.tensorboard = open_tensorboard(state.out, state.step)
    return state


def _register_checkpoint_hooks(state: TrainState) -> None:
    """Checkpoints hold only the adapter (safetensors), and load it exactly (fp32), so accelerate neither writes
    nor looks for a model file."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if state.accelerator.is_main_process:
            save_adapter(state.unwrapped, _export_config(state, state.step), Path(output_dir) / ADAPTER_DIR)
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        models.clear()
        load_checkpoint_adapter(state.unwrapped, input_dir, state.base.fingerprint)

    state.accelerator.register_save_state_pre_hook(save_hook)
    state.accelerator.register_load_state_pre_hook(load_hook)


def _resume(state: TrainState, plan: TrainPlan) -> None:
    """Load the plan's checkpoint into `state` and take its step, time and losses; say what changed since."""
    state.accelerator.load_state(str(plan.resume_from))
    recorded = {"start": FlowStart().model_dump(), **plan.resume_state}  # older checkpoints trained from pure noise
    state.step = state.last_saved = plan.start_step
    state.last_checkpoint = plan.resume_from
    state.elapsed_before = float(recorded.get("elapsed_s", 0.0))
    state.first_loss, state.last_loss = recorded.get("first_loss"), recorded.get("last_loss")
    recipe = state.recipe
    changed = [
        key
        for key, now in (
            ("batch_size", recipe.train.batch_size),
            ("grad_accum", recipe.train.grad_accum),
            ("world_size", state.accelerator.num_processes),
            ("seed", recipe.data.seed),
            ("start", recipe.train.start.model_dump()),
        )
        if recorded.get(key) != now
    ]
    _say(
        state.accelerator,
        state.console,
        f"resumed from {plan.resume_from} at step {state.step}"
        + (f" (changed since: {', '.join(changed)}; the run differs from an uninterrupted one)" if changed else ""),
    )


@contextmanager
def open_training(
    plan: TrainPlan, console: rich.console.Console | None = None, preview: PreviewSettings | None = None
) -> Iterator[TrainState]:
    """The run's TrainState, its output folder locked (main process) until the block ends."""
    accelerator, mixed, weight_dtype = make_accelerator(plan.recipe)
    with output_lock(Path(plan.recipe.output.dir), accelerator):
        state = setup(
            plan, accelerator, mixed, weight_dtype, console or Console(stderr=True), preview or PreviewSettings()
        )
        try:
            yield state
        finally:
            if state.tensorboard is not None:
                state.tensorboard.close()


def _export_config(state: TrainState, step: int) -> AdapterConfig:
    """The adapter config of this run at `step` (see `checkpoints.export_config`)."""
    return export_config(state.adapter_config, state.recipe, step, state.first_loss, state.last_loss)


def _state_record(state: TrainState, elapsed: float) -> dict[str, Any]:
    """The trainer_state.json of a checkpoint at the current step: the step, the run's facts and losses."""
    recipe = state.recipe
    return {
        "format": STATE_FORMAT,
        "version": 1,
        "step": state.step,
        "data_step": state.step * recipe.train.grad_accum,
        "total_steps": recipe.train.steps,
        "batch_size": recipe.train.batch_size,
        "grad_accum": recipe.train.grad_accum,
        "world_size": state.accelerator.num_processes,
        "seed": recipe.data.seed,
        "start": recipe.train.start.model_dump(),
        "classes": state.classes,
        "trainable": recipe.train.trainable,
        "lora_rank": state.adapter_config.lora_rank,
        "base_fingerprint": state.base.fingerprint,
        "elapsed_s": elapsed,
        "first_loss": state.first_loss,
        "last_loss": state.last_loss,
        "tool": f"mdsd3 {__version__}",
    }


def save_checkpoint(state: TrainState, elapsed: float) -> Path:
    """OUT/checkpoints/step-N of the current step (see `checkpoints.write_checkpoint`); every process calls it."""
    final = write_checkpoint(
        state.accelerator, state.out, state.step, _state_record(state, elapsed), state.recipe.output.keep_checkpoints
    )
    state.last_saved, state.last_checkpoint = state.step, final
    return final


def export_adapter(state: TrainState) -> Path:
    """OUT/adapter at the current step: the trained adapter, loadable by `weights.build_model` and `mdsd3 generate`."""
    target = state.out / ADAPTER_DIR
    if state.accelerator.is_main_process:
        save_adapter(state.unwrapped, _export_config(state, state.step), target, root=state.out)
    state.accelerator.wait_for_everyone()
    return target


def write_preview(state: TrainState) -> Path | None:
    """OUT/previews/step-N.png of the current step (main process; the others wait)."""
    path = None
    accelerator = state.accelerator
    if accelerator.is_main_process and state.preview_batch is not None and len(state.preview_batch):
        config = _export_config(state, state.step)
        pipeline = preview_pipeline(state.base, state.unwrapped, config, state.prompt_embeddings, state.preview)
        state.unwrapped.eval()
        try:
            with torch.no_grad(), accelerator.autocast():
                grid = render_preview(pipeline, state.preview_batch, state.classes, state.preview)
        finally:
            state.unwrapped.train()
        path = state.out / PREVIEWS / f"{checkpoint_name(state.step)}.png"
        atomic_write(path, lambda file: grid.save(file, format="PNG", compress_level=1), root=state.out)
    accelerator.wait_for_everyone()
    return path


def compute_loss(state: TrainState, data_step: int, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The loss of this rank's micro batch at `data_step` (forward only)."""
    recipe, rank = state.recipe, state.accelerator.process_index
    dropped = condition_drop_mask(
        recipe.data.seed, data_step, batch["clean"].shape[0], recipe.data.condition_drop, rank
    )
    prompts, mask = batch_conditioning(batch["ratios"], dropped, state.classes, state.adapter_config.head_partition)
    embeds, pooled = state.prompts.batch(prompts)
    clean, target = state.encoder.pair(batch)
    return flow_matching_loss(
        state.model,
        clean,
        target,
        embeds,
        pooled,
        mask.to(state.accelerator.device),
        step_generator(recipe.data.seed, data_step, rank),
        state.schedule,
        recipe.train.logit_mean,
        recipe.train.logit_std,
        start=recipe.train.start,
    )


def _batches(state: TrainState, start_step: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """This rank's (data step, micro batch) from optimizer step `start_step` on; no loader starts when the run
    has no step left."""
    train, accelerator = state.recipe.train, state.accelerator
    if start_step < train.steps:
        yield from state.dataset.batches(
            start_step * train.grad_accum,
            train.steps * train.grad_accum,
            train.batch_size,
            accelerator.process_index,
            accelerator.num_processes,
            pin_memory=accelerator.device.type == "cuda",
            decode_once=state.encoder.cache is not None,
        )


def train(state: TrainState) -> TrainSummary:
    """Train from the state's step to `train.steps`: checkpoints, previews, log and the adapter export."""
    accelerator, recipe = state.accelerator, state.recipe
    out, total, ga = recipe.output, recipe.train.steps, recipe.train.grad_accum
    start_step = state.step
    summary = TrainSummary(
        state.out, total, start_step, start_step, state.first_loss, state.last_loss, checkpoint=state.last_checkpoint
    )
    started = time.perf_counter()
    elapsed = lambda: state.elapsed_before + time.perf_counter() - started  # noqa: E731
    window: list[float] = []
    micro_losses: list[torch.Tensor] = []
    grad_norm: float | None = None
    progress = (
        RunProgress(max(total - start_step, 0), "train", unit="steps", console=state.console)
        if accelerator.is_main_process
        else _NoProgress()
    )
    stop_signal = None
    with StopRequest(TRAIN_STOP_SIGNALS) as stop, progress, closing(_batches(state, start_step)) as batches:
        for data_step, batch in batches:
            with accelerator.accumulate(state.model):
                loss = compute_loss(state, data_step, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(state.trainable, recipe.train.max_grad_norm)
                    grad_norm = float(norm) if norm is not None else None
                state.optimizer.step()
                state.lr_scheduler.step()
                state.optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.detach())
            if data_step % ga != ga - 1:
                continue
            state.step += 1
            step_loss = torch.stack(micro_losses).mean()
            micro_losses.clear()
            if accelerator.num_processes > 1:
                step_loss = accelerator.gather(step_loss[None]).mean()
            value = float(step_loss)
            if not math.isfinite(value):
                raise FloatingPointError(f"loss is {value} at step {state.step}; lower train.lr or check the data")
            state.first_loss = value if state.first_loss is None else state.first_loss
            state.last_loss = value
            window.append(value)
            progress.advance()
            if state.step % out.log_every == 0 or state.step == total:
                record = {
                    "step": state.step,
                    "loss": sum(window) / len(window),
                    "lr": state.lr_scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "elapsed": round(elapsed(), 3),
                }
                if accelerator.is_main_process:
                    append_log(state.out, record, state.tensorboard)
                window.clear()
            stop_signal = agree_on_stop(stop, accelerator)
            if state.step % out.checkpoint_every == 0 or state.step == total or stop_signal:
                summary.checkpoint = save_checkpoint(state, elapsed())
            if out.preview_every and (state.step % out.preview_every == 0 or state.step == total) and not stop_signal:
                write_preview(state)
                summary.previews += 1
            if stop_signal:
                break
    if stop_signal and state.step > state.last_saved:
        summary.checkpoint = save_checkpoint(state, elapsed())
    summary.end_step = state.step
    summary.first_loss, summary.last_loss = state.first_loss, state.last_loss
    summary.elapsed_s = time.perf_counter() - started
    summary.stopped_by = stop_signal
    summary.skipped = state.dataset.report.counts()
    if stop_signal is None:
        if state.step > state.last_saved:
            summary.checkpoint = save_checkpoint(state, elapsed())
        summary.adapter_dir = export_adapter(state)
    accelerator.end_training()
    return summary


def run_train(
    recipe: TrainRecipe,
    resume: str | os.PathLike | None = None,
    console: rich.console.Console | None = None,
    preview: PreviewSettings | None = None,
) -> TrainSummary:
    """Train the adapter a recipe describes: `plan_training`, `open_training`, `train`."""
    with open_training(plan_training(recipe, resume), console, preview) as state:
        return train(state)
