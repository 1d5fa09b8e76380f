#!/usr/bin/env python
"""Benchmark MDSD3 against stock SD3: per-step time, cache build, sampler throughput and peak memory."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from diffusers import AutoencoderKL, SD3Transformer2DModel  # noqa: E402
from diffusers.models.attention_processor import JointAttnProcessor2_0  # noqa: E402

from mdsd3_cli.model.heads import all_prompts  # noqa: E402
from mdsd3_cli.model.prompts import PromptEmbedding  # noqa: E402
from mdsd3_cli.model.sampler import MDSD3Sampler, SampleRequest  # noqa: E402
from mdsd3_cli.model.transformer import MDSD3AttnProcessor, MDSD3Transformer  # noqa: E402
from mdsd3_cli.model.weights import (  # noqa: E402
    SD3_MEDIUM_TRANSFORMER,
    SD3_SCHEDULER,
    BaseModel,
    build_tiny,
    describe_parameters,
    fresh_adapter_config,
)

# --- presets ------------------------------------------------------------------------------------------------

MID_TRANSFORMER = dict(
    sample_size=64,
    patch_size=2,
    in_channels=16,
    num_layers=4,
    attention_head_dim=64,
    num_attention_heads=6,
    joint_attention_dim=512,
    caption_projection_dim=384,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=96,
)
_VAE_COMMON = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    shift_factor=0.0609,
    scaling_factor=1.5305,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
SD3_VAE = dict(_VAE_COMMON, block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024)
MID_VAE = dict(_VAE_COMMON, block_out_channels=(64, 128, 256, 256), layers_per_block=2, sample_size=512)
PRESETS = {"mid": (MID_TRANSFORMER, MID_VAE), "sd3-medium": (SD3_MEDIUM_TRANSFORMER, SD3_VAE)}

CLASSES = ["rain", "haze", "noise"]
# Per-sample class ratios cycled over the images of a batch (binary, blended and empty requests).
RATIO_CYCLE = [{"rain": 1.0}, {"rain": 1.0, "haze": 0.5}, {"noise": 1.0}, {}, {"haze": 1.0, "noise": 0.3}]
TEXT_TOKENS = 333  # SD3: 77 CLIP tokens + 256 T5 tokens
Z_STD = 0.01  # Z layers: small random, so the injections are non-zero and the cached path does real work
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STEP_VARIANTS = ("stock", "cached", "recomputed")
COMPILED_VARIANTS = ("stock_compiled", "cached_compiled")

HELP = (
    __doc__
    + """
What is measured, for every --size x --batch combination (batch = images; with classifier-free guidance the
transformer sees 2 x images samples):

  step_ms (median ms of one transformer forward, i.e. one denoising step at guidance > 1)
    stock            diffusers.SD3Transformer2DModel.forward with the base weights (stock attention processor),
                     batch 2 x images.
    cached           MDSD3Transformer.forward(..., head_mask=..., clean_injections=encode_clean(clean)): the
                     clean-image injections are built once per image (not timed here) and broadcast over both
                     guidance halves. This is what the sampler does at every step.
    recomputed       MDSD3Transformer.forward(..., head_mask=..., clean_latents=clean): the clean branch runs
                     inside the block loop at every step (the training path), for `images` clean latents.
    stock_compiled, cached_compiled   (--compile) the same under torch.compile(dynamic=False); their ratio
                     is taken against stock_compiled. The first call (compilation) is reported as compile_s;
                     every size x batch compiles anew. On CPU inductor compiles in-process (no worker pool
                     competing with the timed work) unless TORCHINDUCTOR_COMPILE_THREADS is set.
    Reading the ratios: an eager SD3-medium forward launches ~1400 kernels; on a slow host CPU that takes
    30-60 ms, so small workloads (512 px, 1-2 images) are launch-bound and their eager medians jitter (compare
    min_ms, or --compile). The cached path launches a few more (mask, injection adds) but its attention
    processor concatenates before the head split, which spares the stock processor's [B, H, T, hd] concat:
    GPU-bound, cached can come out slightly below 1.00x.
  cache_build_ms   MDSD3Transformer.encode_clean for `images` clean latents (done once per image), with the
                   cache's size in GiB.
  sampler_images_per_s   MDSD3Sampler.generate end to end: VAE encode, cache build, --steps Euler steps at
                   --guidance 7 (2 x images transformer batch), VAE decode to uint8 numpy. Prompt embeddings
                   are random tensors of SD3's shape (333 tokens) for every prompt of
                   heads.all_prompts({classes}): no text encoder runs. With --warmup > 0 a 1-step generate
                   warms up first. Skipped with --skip-sampler.
  peak_memory_gib  per variant above. CUDA: torch.cuda.max_memory_allocated, reset before each variant.
                   CPU: the process's peak resident set size (VmHWM from /proc/self/status, reset before each
                   variant by writing 5 to /proc/self/clear_refs); where that reset is impossible, the
                   lifetime ru_maxrss (monotonic). Each line's memory_kind says which. Weights are included.

Presets (random weights, built fast: parameters materialised on the target device and filled with uniform
noise; the Z layers are small random, not zero):
  tiny        weights.build_tiny(): 2 blocks, 6 heads x 8, with the tiny VAE. For tests.
  mid         CPU-sized: 4 blocks, 6 heads x 64 (width 384), text width 512, pooled 2048, patch 2,
              pos_embed_max_size 96; VAE (64,128,256,256) x 2 layers, 16 latent channels.
  sd3-medium  the real SD3-medium transformer config: 24 blocks, 24 heads x 64 (width 1536), joint_attention_dim
              4096, caption_projection_dim 1536, pooled 2048, sample_size 128, pos_embed_max_size 192 (2.03 B
              parameters); SD3's VAE config (128,256,512,512) x 2 layers, 16 latent channels, shift 0.0609,
              scale 1.5305, no quant convs.

Output: one JSON object per line on stdout, one per measurement; every line carries preset, device, gpu,
dtype, size, images and transformer_batch. A {"measure": "setup"} line comes first, {"measure": "skipped"}
lines name a combination or variant that ran out of memory (the run goes on). A human-readable table is
printed on stderr at the end, so stdout stays machine-readable:

  python scripts/benchmark.py --preset sd3-medium --device cuda --size 512,1024 --batch 2,8 > bench.jsonl
  python scripts/benchmark.py --preset mid --device cpu --size 256 --batch 1
  python scripts/benchmark.py --preset tiny --size 32 --iters 1 --warmup 0 --steps 1
""".replace("{classes}", str(CLASSES))
)


# --- small utilities ----------------------------------------------------------------------------------------


def _int_list(values: list[str] | None, default: list[int]) -> list[int]:
    """`--size 512,1024 --size 2048` -> [512, 1024, 2048]."""
    if not values:
        return list(default)
    out = []
    for value in values:
        out.extend(int(part) for part in value.split(",") if part.strip())
    return out


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def _oom_reason(error: BaseException) -> str:
    """A one-line reason; re-raises anything that is not an out-of-memory error.

    Only the string leaves the `except` block, so the traceback (and the tensors its frames hold) can be freed.
    """
    if not _is_oom(error):
        raise error
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Memory:
    """Peak memory of a stretch of work: CUDA allocator peak, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif self._clear_refs():
            self.kind = "process_rss_peak (VmHWM, reset via /proc/self/clear_refs)"
        else:
            self.kind = "process_rss_peak (ru_maxrss, lifetime peak, not reset)"

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return _proc_status("VmHWM") is not None
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif "VmHWM" in self.kind:
            self._clear_refs()

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        if "VmHWM" in self.kind:
            return _proc_status("VmHWM") / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def current_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**30
        rss = _proc_status("VmRSS")
        return float("nan") if rss is None else rss / 2**20


def _proc_status(key: str) -> int | None:
    """A kB figure from /proc/self/status."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], iters: int, warmup: int, device: torch.device) -> tuple[list[float], float, Any]:
    """Per-call milliseconds of `fn` (CUDA events on GPU, perf_counter on CPU), the first call's seconds, the last result."""
    result = None
    first_s = float("nan")
    for index in range(warmup):
        start = time.perf_counter()
        result = fn()
        _sync(device)
        if index == 0:
            first_s = time.perf_counter() - start
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for index, (begin, end) in enumerate(events):
            wall = time.perf_counter()
            begin.record()
            result = fn()
            end.record()
            if index == 0 and warmup == 0:
                torch.cuda.synchronize(device)
                first_s = time.perf_counter() - wall
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        for index in range(iters):
            start = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - start) * 1000.0)
            if index == 0 and warmup == 0:
                first_s = times[0] / 1000.0
    return times, first_s, result


# --- building random models fast ----------------------------------------------------------------------------


@torch.no_grad()
def _fill_random(module: torch.nn.Module, seed: int) -> None:
    """Cheap random init: weights uniform with PyTorch's default std (1/sqrt(3 fan_in)), biases 0, 1-D weights 1."""
    generator_device = next(module.parameters()).device
    generator = torch.Generator(generator_device).manual_seed(seed)
    for name, param in module.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() < 2:
            param.fill_(1.0)
        else:
            fan_in = param[0].numel()
            bound = 1.0 / math.sqrt(fan_in)  # uniform(-b, b) has std b/sqrt(3)
            param.uniform_(-bound, bound, generator=generator)


def build_random_transformer(
    config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int
) -> SD3Transformer2DModel:
    """An SD3 transformer with random weights, parameters allocated on `device` in `dtype` without a slow init.

    Parameters are created on the meta device (buffers, i.e. the sin-cos positional table, for real), then
    materialised on the target device and filled with uniform noise there.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = SD3Transformer2DModel(**config)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in buffers.items():
            model.get_buffer(name).copy_(buffer)
    model.to(dtype)
    _fill_random(model, seed)
    return model.eval()


def build_random_vae(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            vae = AutoencoderKL(**config)
    return vae.to(dtype).eval()


@dataclass
class Bench:
    """Everything measured shares this: the base (stock) model, the MDSD3 model on the same modules, the sampler."""

    base: BaseModel
    model: MDSD3Transformer
    sampler: MDSD3Sampler
    device: torch.device
    dtype: torch.dtype
    build_s: float
    compiled: dict[str, Callable] = field(default_factory=dict)

    # MDSD3Transformer.from_base reuses the base's blocks and installs MDSD3AttnProcessor on them, so the stock
    # measurement switches the shared attention modules back to diffusers' own processor first.
    def use_stock(self) -> None:
        self.base.transformer.set_attn_processor(JointAttnProcessor2_0())

    def use_mdsd3(self) -> None:
        self.model.set_attn_processor(MDSD3AttnProcessor())


def build_bench(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Bench:
    start = time.perf_counter()
    if preset == "tiny":
        base = build_tiny(dtype=dtype, device=device)
    else:
        transformer_config, vae_config = PRESETS[preset]
        transformer = build_random_transformer(transformer_config, device, dtype, seed)
        vae = build_random_vae(vae_config, device, dtype, seed + 1)
        base = BaseModel(preset, transformer, vae, dict(SD3_SCHEDULER), f"benchmark-{preset}-random-{seed}")
    config = fresh_adapter_config(base, CLASSES)
    model = MDSD3Transformer.from_base(base.transformer)
    generator = torch.Generator(device).manual_seed(seed + 2)
    with torch.no_grad():
        for block in model.clean_blocks:
            for z in (block.z_q, block.z_k, block.z_v):
                z.weight.normal_(0.0, Z_STD, generator=generator)
    model.eval()
    text_width = base.transformer.config.joint_attention_dim
    pooled_width = base.transformer.config.pooled_projection_dim
    prompt_generator = torch.Generator().manual_seed(seed + 3)
    prompts = {
        prompt: PromptEmbedding(
            torch.randn(TEXT_TOKENS, text_width, generator=prompt_generator),
            torch.randn(pooled_width, generator=prompt_generator),
        )
        for prompt in all_prompts(CLASSES)
    }
    sampler = MDSD3Sampler(base, model, config, prompts)
    _sync(device)
    return Bench(base, model, sampler, device, dtype, time.perf_counter() - start)


# --- one size x batch combination ---------------------------------------------------------------------------


def requests_for(images: int) -> list[SampleRequest]:
    return [SampleRequest(RATIO_CYCLE[i % len(RATIO_CYCLE)], seed=1000 + i) for i in range(images)]


@dataclass
class Inputs:
    latents: torch.Tensor  # [2B, 16, h, w]
    embeds: torch.Tensor
    pooled: torch.Tensor
    timestep: torch.Tensor
    mask: torch.Tensor  # [2B, H]: zeros (unconditional half) then the class masks
    clean: torch.Tensor  # [B, 16, h, w]


def make_inputs(bench: Bench, size: int, images: int) -> Inputs:
    generator = torch.Generator().manual_seed(size * 100 + images)
    latent_side = size // 8
    channels = bench.model.config.in_channels
    clean = torch.randn(images, channels, latent_side, latent_side, generator=generator)
    latents = torch.randn(2 * images, channels, latent_side, latent_side, generator=generator)
    cond, uncond = bench.sampler.request_conditioning(requests_for(images))
    to = dict(device=bench.device, dtype=bench.dtype)
    return Inputs(
        latents=latents.to(**to),
        embeds=torch.cat([uncond.embeds, cond.embeds]),
        pooled=torch.cat([uncond.pooled, cond.pooled]),
        timestep=torch.full((2 * images,), 500.0, device=bench.device),
        mask=torch.cat([uncond.head_mask, cond.head_mask]),
        clean=clean.to(**to),
    )


def _step_fn(bench: Bench, variant: str, inputs: Inputs, cache: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    common = dict(
        hidden_states=inputs.latents,
        encoder_hidden_states=inputs.embeds,
        pooled_projections=inputs.pooled,
        timestep=inputs.timestep,
        return_dict=False,
    )
    if variant.endswith("_compiled") and not bench.compiled:
        # Wrapped lazily: torch.compile starts inductor's worker pool, which would disturb the first eager timings.
        bench.compiled = {
            "stock": torch.compile(bench.base.transformer, dynamic=False),
            "cached": torch.compile(bench.model, dynamic=False),
        }
    if variant in ("stock", "stock_compiled"):
        bench.use_stock()
        module = bench.compiled["stock"] if variant == "stock_compiled" else bench.base.transformer
        return lambda: module(**common)[0]
    bench.use_mdsd3()
    if variant in ("cached", "cached_compiled"):
        module = bench.compiled["cached"] if variant == "cached_compiled" else bench.model
        return lambda: module(**common, head_mask=inputs.mask, clean_injections=cache)[0]
    if variant == "recomputed":
        return lambda: bench.model(**common, head_mask=inputs.mask, clean_latents=inputs.clean)[0]
    raise ValueError(variant)


def run_combination(
    bench: Bench,
    args: argparse.Namespace,
    size: int,
    images: int,
    common: dict[str, Any],
    memory: Memory,
    rows: list[dict[str, Any]],
) -> None:
    device = bench.device

    def record(line: dict[str, Any]) -> None:
        line = {**line, **common}
        emit(line)
        rows.append(line)

    def skipped(what: str, reason: str) -> None:
        record({"measure": "skipped", "variant": what, "reason": reason})
        _free(device)

    def peak(variant: str, gib: float) -> None:
        record({"measure": "peak_memory_gib", "variant": variant, "gib": round(gib, 4), "memory_kind": memory.kind})

    inputs = oom = None
    try:
        inputs = make_inputs(bench, size, images)
    except Exception as error:  # noqa: BLE001
        oom = _oom_reason(error)
    if oom is not None:
        skipped("all", oom)
        return

    cache = None
    oom = None
    with torch.no_grad():
        # cache build (encode_clean) ---------------------------------------------------------------------
        try:
            bench.use_mdsd3()
            memory.reset()
            times, _, cache = time_calls(
                lambda: bench.model.encode_clean(inputs.clean), args.iters, args.warmup, device
            )
            ms = statistics.median(times)
            record(
                {
                    "measure": "cache_build_ms",
                    "variant": "encode_clean",
                    "ms": round(ms, 3),
                    "ms_per_image": round(ms / images, 3),
                    "cache_gib": round(cache.numel() * cache.element_size() / 2**30, 6),
                    "cache_shape": list(cache.shape),
                    "iters": args.iters,
                }
            )
            peak("cache_build", memory.peak_gib())
        except Exception as error:  # noqa: BLE001
            oom = _oom_reason(error)
        if oom is not None:
            del inputs
            skipped("cache_build", oom)
            return

        # per-step time of every variant ------------------------------------------------------------------
        variants = list(STEP_VARIANTS) + (list(COMPILED_VARIANTS) if args.compile else [])
        step_ms: dict[str, float] = {}
        for variant in variants:
            oom = None
            try:
                fn = _step_fn(bench, variant, inputs, cache)
                warmup = max(args.warmup, 2) if variant.endswith("_compiled") else args.warmup
                memory.reset()
                times, first_s, out = time_calls(fn, args.iters, warmup, device)
                gib = memory.peak_gib()
                ms = statistics.median(times)
                step_ms[variant] = ms
                baseline = "stock_compiled" if variant.endswith("_compiled") else "stock"
                line = {
                    "measure": "step_ms",
                    "variant": variant,
                    "ms": round(ms, 3),
                    "min_ms": round(min(times), 3),
                    "iters": len(times),
                    "ratio_to_stock": round(ms / step_ms[baseline], 4) if baseline in step_ms else None,
                    "baseline": baseline,
                    "finite": bool(torch.isfinite(out).all()),
                }
                if variant.endswith("_compiled"):
                    line["compile_s"] = round(first_s, 2)
                    if "stock" in step_ms:
                        line["ratio_to_stock_eager"] = round(ms / step_ms["stock"], 4)
                record(line)
                peak(variant, gib)
                out = None
            except Exception as error:  # noqa: BLE001
                oom = _oom_reason(error)
            if oom is not None:
                fn = out = None
                skipped(variant, oom)
        fn = out = cache = inputs = None
        _free(device)

    # sampler end to end ---------------------------------------------------------------------------------------
    if args.skip_sampler:
        return
    oom = None
    try:
        bench.use_mdsd3()
        generator = torch.Generator().manual_seed(size + images)
        pixels = torch.randint(0, 256, (images, size, size, 3), dtype=torch.uint8, generator=generator)
        requests = requests_for(images)
        memory.reset()
        if args.warmup:
            bench.sampler.generate(pixels, requests, steps=1, guidance=args.guidance)  # VAE + transformer warm-up
        seconds = []
        for _ in range(args.sampler_iters):
            _sync(device)
            start = time.perf_counter()
            bench.sampler.generate(pixels, requests, steps=args.steps, guidance=args.guidance)
            _sync(device)
            seconds.append(time.perf_counter() - start)
        gib = memory.peak_gib()
        median_s = statistics.median(seconds)
        record(
            {
                "measure": "sampler_images_per_s",
                "variant": "generate",
                "images_per_s": round(images / median_s, 4),
                "seconds_per_batch": round(median_s, 3),
                "steps": args.steps,
                "guidance": args.guidance,
                "iters": len(seconds),
            }
        )
        peak("sampler", gib)
    except Exception as error:  # noqa: BLE001
        oom = _oom_reason(error)
    if oom is not None:
        skipped("sampler", oom)
    _free(device)


# --- report --------------------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]], setup: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    title = (
        f"MDSD3 benchmark: preset {setup['preset']}, {setup['gpu'] or 'CPU'}, {setup['dtype']}"
        f" (build {setup['build_s']} s)"
    )
    table = Table(title=title)
    for column in ("size", "images", "batch", "measure", "variant", "value", "vs stock", "peak GiB"):
        table.add_column(column, justify="left" if column in ("measure", "variant") else "right")
    peaks = {(r["size"], r["images"], r["variant"]): r["gib"] for r in rows if r["measure"] == "peak_memory_gib"}
    peak_key = {"encode_clean": "cache_build", "generate": "sampler"}
    for row in rows:
        measure = row["measure"]
        if measure == "peak_memory_gib":
            continue
        if measure == "step_ms":
            value, unit = f"{row['ms']:.2f} ms", row["ratio_to_stock"]
            ratio = "" if unit is None else f"{unit:.2f}x"
        elif measure == "cache_build_ms":
            value, ratio = f"{row['ms']:.2f} ms ({row['cache_gib']:.3f} GiB)", ""
        elif measure == "sampler_images_per_s":
            value, ratio = f"{row['images_per_s']:.3f} img/s ({row['steps']} steps)", ""
        else:
            value, ratio = row.get("reason", ""), ""
        gib = peaks.get((row["size"], row["images"], peak_key.get(row["variant"], row["variant"])))
        table.add_row(
            str(row["size"]),
            str(row["images"]),
            str(row["transformer_batch"]),
            measure,
            row["variant"],
            value,
            ratio,
            "" if gib is None else f"{gib:.2f}",
        )
    console.print(table)
    console.print(f"peak memory: {setup['memory_kind']}; step ratios of *_compiled are against stock_compiled")


# --- main -----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset",
        choices=("tiny", "mid", "sd3-medium"),
        default=None,
        help="model size (random weights); default sd3-medium on cuda, mid on cpu",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default cuda when available, else cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    parser.add_argument(
        "--size",
        action="append",
        metavar="PX",
        help="image side in pixels (multiple of 16); repeatable or comma list, e.g. 512,1024. "
        "Default 1024 on cuda, 256 on cpu",
    )
    parser.add_argument(
        "--batch",
        action="append",
        metavar="IMAGES",
        help="images per batch (the transformer batch is 2x this, for guidance); repeatable or "
        "comma list, e.g. 2,8. Default 1",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="Euler steps of the sampler measurement; default 28 on cuda, 4 on cpu"
    )
    parser.add_argument("--guidance", type=float, default=7.0, help="sampler guidance scale (default 7)")
    parser.add_argument(
        "--iters",
        type=int,
        default=None,
        help="timed calls per step/cache measurement (median reported); default 10 on cuda, 5 on cpu",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls first; default 3 on cuda, 1 on cpu. With --warmup 0 the sampler is not warmed up either",
    )
    parser.add_argument("--sampler-iters", type=int, default=1, help="timed sampler.generate calls (default 1)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also measure torch.compile'd stock and cached (each size x batch recompiles)",
    )
    parser.add_argument("--skip-sampler", action="store_true", help="skip the end-to-end sampler measurement")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    args = parser.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    cuda = args.device == "cuda"
    args.preset = args.preset or ("sd3-medium" if cuda else "mid")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.sizes = _int_list(args.size, [1024] if cuda else [256])
    args.batches = _int_list(args.batch, [1])
    args.steps = args.steps if args.steps is not None else (28 if cuda else 4)
    args.iters = args.iters if args.iters is not None else (10 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    if args.iters < 1 or args.warmup < 0 or args.steps < 1 or args.sampler_iters < 1:
        parser.error("--iters, --steps and --sampler-iters must be >= 1, --warmup >= 0")
    max_patches = {
        "tiny": 96,
        "mid": MID_TRANSFORMER["pos_embed_max_size"],
        "sd3-medium": SD3_MEDIUM_TRANSFORMER["pos_embed_max_size"],
    }[args.preset]
    for size in args.sizes:
        if size <= 0 or size % 16:
            parser.error(f"--size {size}: image sides must be positive multiples of 16 (VAE factor 8 x patch 2)")
        if size // 16 > max_patches:
            parser.error(f"--size {size}: preset {args.preset}'s positional table allows at most {max_patches * 16} px")
    if any(b < 1 for b in args.batches):
        parser.error("--batch must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.compile:
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        if device.type == "cpu" and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
            import torch._inductor.config as inductor_config

            inductor_config.compile_threads = 1  # a worker pool competes with the timed CPU work on few cores
    memory = Memory(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    bench = build_bench(args.preset, device, dtype, args.seed)
    params = describe_parameters(bench.model)
    setup = {
        "measure": "setup",
        "preset": args.preset,
        "device": args.device,
        "gpu": gpu,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "build_s": round(bench.build_s, 2),
        "params_base": params["base"],
        "params_clean_branch": params["clean_branch"] + params["z_layers"],
        "weights_gib": round(memory.current_gib(), 4),
        "memory_kind": memory.kind,
        "sizes": args.sizes,
        "batches": args.batches,
        "iters": args.iters,
        "warmup": args.warmup,
        "steps": args.steps,
        "compile": args.compile,
    }
    emit(setup)
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        for images in args.batches:
            common = {
                "preset": args.preset,
                "device": args.device,
                "gpu": gpu,
                "dtype": args.dtype,
                "size": size,
                "images": images,
                "transformer_batch": 2 * images,
            }
            run_combination(bench, args, size, images, common, memory, rows)
    print_table(rows, setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
