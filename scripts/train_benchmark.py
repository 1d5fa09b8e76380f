#!/usr/bin/env python3
"""Training speed and peak memory of `mdsd3 train`'s step; one JSON line per measurement on stdout.

    python scripts/train_benchmark.py --device cpu                 # tiny preset, 64/128 px, batch 1/4, ckpt off/on
    python scripts/train_benchmark.py --device cuda                # SD3-medium size (random bf16 weights), 512 px
    python scripts/train_benchmark.py --device cuda --resolution 1024 --batch 1 --checkpointing on

A step is exactly what the trainer runs per micro batch (mdsd3_cli.train.step.flow_matching_loss on the uncached
clean-branch path, backward, gradient clipping, AdamW), on random latents and prompt embeddings: no VAE and no
text encoders are involved. Precision as in training: frozen base in bf16 with bf16 autocast and fp32
trainable parameters on CUDA; everything fp32 on the CPU. SD3-medium weights are random (built directly on the
GPU), so only speed and memory mean something.

Peak memory: CUDA `max_memory_allocated` (weights + optimizer state + activations) per measurement; on the CPU
each measurement runs in its own process and reports that process's peak resident set size (includes Python
and torch, about 0.4-0.5 GiB).

`--trainer` (CPU) also times the whole training loop (`train.run.train`) (data loading, VAE encoding or latent cache, logging) on
configs/train_tiny.yaml with synthetic pairs from examples/photos.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONTEXT_TOKENS = 77 + 256  # CLIP-L/G + T5 (SD3 prompt encoding)
CLASSES = ["rain", "haze", "noise"]


def build(preset: str, device: torch.device, lora_rank: int, trainable: str):
    """(MDSD3 model with trainable parameters in fp32, trainable parameter list, FlowSchedule, joint dim, pooled dim)."""
    from diffusers import SD3Transformer2DModel

    from mdsd3_cli.model.weights import (
        SD3_MEDIUM_TRANSFORMER,
        SD3_SCHEDULER,
        BaseModel,
        build_model,
        build_tiny,
        fresh_adapter_config,
    )
    from mdsd3_cli.train.step import FlowSchedule, set_trainable, upcast_trainable

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if preset == "tiny":
        base = build_tiny(dtype=dtype, device=device)
    else:
        torch.manual_seed(0)
        with torch.device(device):  # random init on the GPU: seconds, not minutes
            transformer = SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER)
        transformer.to(dtype).eval()
        base = BaseModel("sd3-medium-random", transformer, None, dict(SD3_SCHEDULER), "random")
    model, _ = build_model(base, config=fresh_adapter_config(base, CLASSES, lora_rank=lora_rank))
    params = set_trainable(model, trainable)
    upcast_trainable(model)
    model.train()
    config = model.config
    return model, params, FlowSchedule.from_base(base), config.joint_attention_dim, config.pooled_projection_dim


def measure(
    preset: str,
    device_name: str,
    resolution: int,
    batch: int,
    checkpointing: bool,
    steps: int,
    warmup: int,
    lora_rank: int,
    trainable: str,
) -> dict:
    """Time `steps` training steps after `warmup` ones; returns the measurement record."""
    from mdsd3_cli.train.step import flow_matching_loss, step_generator

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    started = time.perf_counter()
    model, params, schedule, joint_dim, pooled_dim = build(preset, device, lora_rank, trainable)
    build_s = time.perf_counter() - started
    if checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    heads = model.config.num_attention_heads
    latent = resolution // 8
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(batch, 16, latent, latent, generator=generator).to(device)
    target = torch.randn(batch, 16, latent, latent, generator=generator).to(device)
    embeds = torch.randn(batch, CONTEXT_TOKENS, joint_dim, generator=generator).to(device)
    pooled = torch.randn(batch, pooled_dim, generator=generator).to(device)
    mask = (torch.rand(batch, heads, generator=generator) < 0.5).float().to(device)

    def step(index: int) -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = flow_matching_loss(model, clean, target, embeds, pooled, mask, step_generator(0, index, 0), schedule)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for index in range(warmup):
        step(index)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for index in range(warmup, warmup + steps):
        loss = step(index)
    float(loss)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    record = {
        "mode": "step",
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "preset": preset,
        "resolution": resolution,
        "batch": batch,
        "gradient_checkpointing": checkpointing,
        "trainable": trainable,
        "lora_rank": lora_rank,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "precision": "bf16 autocast" if cuda else "fp32",
        "ms_per_step": round(1000 * seconds, 2),
        "steps_per_s": round(1 / seconds, 3),
        "images_per_s": round(batch / seconds, 3),
        "steps_timed": steps,
        "build_s": round(build_s, 1),
        "torch": torch.__version__,
    }
    if cuda:
        record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    else:
        record["peak_rss_gib"] = round(_peak_rss_bytes() / 2**30, 3)
    return record


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def measure_trainer(resolution: int, steps: int) -> dict:
    """The whole training loop on configs/train_tiny.yaml (tiny preset, synthetic pairs), CPU."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_synthetic_pairs import make_pairs

    from mdsd3_cli.recipe.train import load_train_recipe
    from mdsd3_cli.train.run import run_train

    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(tmp) / "pairs"
        make_pairs(ROOT / "examples" / "photos", pairs, size=resolution, haze_amount=0.85, noise_sigma=60.0)
        sets = [
            f"output.dir={Path(tmp) / 'run'}",
            f"train.steps={steps}",
            f"data.resolution={resolution}",
            "output.preview_every=0",
            f"model.prompt_cache={Path(tmp) / 'prompts'}",
        ]
        for name in ("haze", "haze_half", "noise", "noise_half"):
            sets += [f"datasets.{name}.clean={pairs / 'clean'}", f"datasets.{name}.degraded={pairs / name}"]
        recipe = load_train_recipe(ROOT / "configs" / "train_tiny.yaml", sets)
        summary = run_train(recipe, console=_quiet_console())  # steps_per_s times the loop, not the setup
    return {
        "mode": "trainer",
        "device": f"cpu ({torch.get_num_threads()} threads)",
        "preset": "tiny",
        "config": "configs/train_tiny.yaml",
        "resolution": resolution,
        "batch": recipe.train.batch_size,
        "steps": summary.steps_done,
        "steps_per_s": round(summary.steps_per_s, 3),
        "images_per_s": round(summary.steps_per_s * recipe.train.batch_size, 3),
        "loss_first": round(summary.first_loss, 4),
        "loss_last": round(summary.last_loss, 4),
        "peak_rss_gib": round(_peak_rss_bytes() / 2**30, 3),
        "torch": torch.__version__,
    }


def _quiet_console():
    from rich.console import Console

    return Console(stderr=True, quiet=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=["tiny", "sd3-medium"], help="default: tiny on CPU, sd3-medium on CUDA")
    parser.add_argument("--resolution", type=int, nargs="+", help="default: 64 128 (CPU), 512 (CUDA)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    parser.add_argument("--trainable", choices=["default", "lora_only"], default="default")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 CUDA, 10 CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--trainer", action="store_true", help="CPU: also time the whole training loop")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one CPU measurement in this process
    args = parser.parse_args(argv)

    if args.one:
        print(json.dumps(measure(**json.loads(args.one))), flush=True)
        return 0
    if args.trainer and not args.one:
        for resolution in args.resolution or [64, 128]:
            print(json.dumps(measure_trainer(resolution, args.steps or 100)), flush=True)
        return 0

    cuda = args.device.startswith("cuda")
    preset = args.preset or ("sd3-medium" if cuda else "tiny")
    resolutions = args.resolution or ([512] if cuda else [64, 128])
    steps = args.steps or (20 if cuda else 10)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    for resolution in resolutions:
        if resolution % 16:
            parser.error(f"--resolution {resolution} is not a multiple of 16")
        for checkpointing in modes:
            for batch in args.batch:
                job = dict(
                    preset=preset,
                    device_name=args.device,
                    resolution=resolution,
                    batch=batch,
                    checkpointing=checkpointing,
                    steps=steps,
                    warmup=args.warmup,
                    lora_rank=args.lora_rank,
                    trainable=args.trainable,
                )
                if cuda:  # in-process; free the previous measurement's model and optimizer first
                    try:
                        record = measure(**job)
                    except torch.cuda.OutOfMemoryError:
                        record = {**job, "error": "CUDA out of memory"}
                    gc.collect()
                    torch.cuda.empty_cache()
                else:  # own process, so the peak RSS belongs to this measurement alone
                    result = subprocess.run(
                        [sys.executable, __file__, "--one", json.dumps(job)],
                        capture_output=True,
                        text=True,
                        env={**os.environ, "DIFFUSERS_VERBOSITY": "error"},
                    )
                    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
                    record = (
                        json.loads(lines[-1])
                        if result.returncode == 0 and lines
                        else {**job, "error": result.stderr.strip().splitlines()[-1:]}
                    )
                print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
