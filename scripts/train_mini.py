#!/usr/bin/env python3
"""Reproduce the `mini` preset, seeded: training crops, joint training, preset folder, fingerprints.

    python scripts/train_mini.py data --out out/mini_data                      # CPU, needs scikit-image
    python scripts/train_mini.py train --cpu --threads 1 --init V2_PRESET --alpha 0.3 --beta 1.0 \
        --prediction residual_x0 --output-conv --couple-noise --phase 64:16:500 --phase 128:8:220 \
        --phase 256:4:60 --lr 2e-4 --warmup 50 --ema 0.99 --stop-at 500 --data out/mini_data --out out/mini_a
    ...                                                                        # mini v3: four such stages, A-D
    python scripts/train_mini.py install --preset out/mini_d/preset            # copy into mdsd3_cli/model/presets/mini

scripts/retrain_mini.sh runs mini v3's data step and its four stages as they were run, from the v2 preset in git,
and installs the result (docs/mini.md).
mini v1 and v2 came from `train` from random weights (flow from pure noise), then from v1 with the flow's source
moved to the noise equation's start z_T = 0.3·ε + 1.0·z_clean (`--alpha/--beta`, as `mdsd3 train`'s
`train.start`); docs/mini.md lists their commands. v3 keeps v2's body and clean branch and adds the residual
x-prediction (`--prediction residual_x0`: the output layer is zeroed, the identity is exact before training;
`--gated-skip` doubles the output channels for the gate g of x̂0 = clean + Δ̂ + g·(x_t − clean)), the
zero-initialised output convolution (`--output-conv`) and degradations whose per-pixel randomness is the
flow's start noise (`--couple-noise`), trained in phases of growing crops up to 256 px (`--phase`).

On a GPU, `train --minutes 7` (batch 128 at 128 px, bf16) fits the step count to the time instead
(scripts/gpu_train_mini.sh); that gives other weights than the CPU schedule above.

`data` writes `crops.safetensors` (uint8 [N, 288, 288, 3] random crops, at random scales, of real photos:
scikit-image's colour photos and grayscale images, matplotlib's grace_hopper, plus those in examples/photos) and
`heldout.safetensors`
(uint8 [2, 128, 128, 3] centre crops of the held-out photos `chelsea` and `coffee`, which no crop comes from).

`train` trains the whole mini model (mdsd3_cli/model/presets/build_mini.py) at once, base and adapter together, with the objective
of `mdsd3 train` (mdsd3_cli/train/step.py: flow matching on the degraded latent, clean branch, head mask from the
ratios, logit-normal σ, condition drop): each step takes random 128-px crops and flips of the training crops
and degrades them on the device with mdsd3_cli/model/presets/degradations.py — one class per sample at a random ratio, or
none (identity pairs), never mixed. bf16 autocast on CUDA; an EMA of the weights is what gets saved. With
`--minutes` the step count is fixed after timing steps 20-60 to fill the time (the log records it; `--steps N`
reproduces that run's schedule). Then OUT/preset/ (base/ + adapter/, fp16), its fingerprints and sizes, a log
(OUT/log.jsonl, OUT/summary.json) and sanity sheets of the held-out photos through the sampler
(OUT/sanity.png: clean | each class | all classes; OUT/sanity_ratios.png: each class at 0, .25, .5, .75, 1).
`--quick` checks the whole pipeline on a CPU in about two minutes (small crops, few steps: the weights mean
nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdsd3_cli.model.adapter import FlowStart  # noqa: E402
from mdsd3_cli.model.heads import all_prompts, partition_heads  # noqa: E402
from mdsd3_cli.model.presets.build_mini import (  # noqa: E402
    MINI_CLASSES,
    MINI_RESOLUTION,
    MINI_TRANSFORMER,
    fresh_mini,
    preset_sizes,
    save_preset,
)
from mdsd3_cli.model.presets.degradations import degrade, quantize  # noqa: E402
from mdsd3_cli.model.presets.mini_photos import COLOUR, EXTRA, GRAY, HELD_OUT  # noqa: E402
from mdsd3_cli.train.data import condition_drop_mask  # noqa: E402
from mdsd3_cli.train.previews import PreviewSettings, preview_pipeline, render_preview  # noqa: E402
from mdsd3_cli.train.step import (  # noqa: E402
    FlowSchedule,
    LatentEncoder,
    PromptTable,
    batch_conditioning,
    flow_matching_loss,
    step_generator,
)

CROP = 288
CROPS = 400
IDENTITY_FRACTION = 0.1
FULL_RATIO_FRACTION = 0.3
CONDITION_DROP = 0.1
RATIO_SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)
CALIBRATION = (20, 60)  # timed steps (after warm-up) that fit the step count to --minutes


# ---------------------------------------------------------------------------------------------- data step


def _skimage_photo(name: str) -> np.ndarray:
    from skimage import data

    if name == "grace_hopper":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
            from PIL import Image

            return np.asarray(Image.open(handle).convert("RGB"))
    image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (255 * (image.astype(np.float64) / max(float(image.max()), 1e-9))).round().astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def load_photos() -> dict[str, np.ndarray]:
    """Training and held-out photos by name: examples/photos where present, else scikit-image's data module."""
    from PIL import Image

    photos = {}
    for name in (*COLOUR, *EXTRA, *GRAY, *HELD_OUT):
        shipped = {"immunohistochemistry": "immunohistochemistry"}.get(name, name)
        path = ROOT / "examples" / "photos" / f"{shipped}.jpg"
        photos[name] = np.asarray(Image.open(path).convert("RGB")) if path.is_file() else _skimage_photo(name)
    return photos


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0))


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    side = min(image.shape[:2])
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    return _resize(image[top : top + side, left : left + side], size)


def make_data(out: Path, count: int = CROPS, seed: int = 0) -> None:
    """crops.safetensors + heldout.safetensors (see the module docstring)."""
    from safetensors.torch import save_file

    photos = load_photos()
    rng = np.random.default_rng(seed)
    names = [*COLOUR, *EXTRA, *GRAY]
    weights = np.array([1.0 if name in GRAY else 2.0 for name in names])
    crops, sources = [], []
    for _ in range(count):
        name = names[rng.choice(len(names), p=weights / weights.sum())]
        image = photos[name]
        short = min(image.shape[:2])
        side = int(round(short * math.exp(rng.uniform(math.log(0.4), 0.0))))
        top, left = rng.integers(0, image.shape[0] - side + 1), rng.integers(0, image.shape[1] - side + 1)
        crops.append(_resize(image[top : top + side, left : left + side], CROP))
        sources.append(name)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"seed": str(seed), "sources": json.dumps(sources), "held_out": json.dumps(list(HELD_OUT))}
    save_file({"images": torch.from_numpy(np.stack(crops))}, str(out / "crops.safetensors"), metadata=meta)
    held = np.stack([centre_crop(photos[name], MINI_RESOLUTION) for name in HELD_OUT])  # sanity sheets only
    save_file(
        {"images": torch.from_numpy(held)},
        str(out / "heldout.safetensors"),
        metadata={"names": json.dumps(list(HELD_OUT))},
    )
    used = {name: sources.count(name) for name in names}
    print(
        f"wrote {count} crops of {CROP} px to {out}/crops.safetensors ({(out / 'crops.safetensors').stat().st_size / 1e6:.1f} MB)"
    )
    print(f"crops per photo: {used}; held out: {', '.join(HELD_OUT)} -> {out}/heldout.safetensors")


# ---------------------------------------------------------------------------------------------- training step


class Batches:
    """Random crops, flips, classes and ratios of one training step, a pure function of (seed, step)."""

    def __init__(
        self,
        crops: torch.Tensor,
        size: int,
        batch: int,
        seed: int,
        device: torch.device,
        class_weights: dict[str, float] | None = None,
    ):
        self.crops, self.size, self.batch, self.seed, self.device = crops.to(device), size, batch, seed, device
        weights = np.array([(class_weights or {}).get(name, 1.0) for name in MINI_CLASSES])
        self.class_mix = None if class_weights is None else weights / weights.sum()

    def __call__(
        self, step: int, size: int | None = None, batch: int | None = None, field: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clean [B, 3, S, S] in [0, 1], degraded likewise, ratios [B, K]); S is `size` or the default crop, B
        `batch` or the default batch. `field` [B, 3, S, S] (standard normal) drives the degradations' per-pixel
        randomness when given (the coupling to the flow's start noise)."""
        size, batch = size or self.size, batch or self.batch
        rng = np.random.default_rng([self.seed, 0xDA7A, step])
        count, full = self.crops.shape[0], self.crops.shape[1]
        index = rng.integers(0, count, batch)
        ys, xs = rng.integers(0, full - size + 1, (2, batch))
        flips = rng.random(batch) < 0.5
        if self.class_mix is None:
            classes = rng.integers(0, len(MINI_CLASSES), batch)
        else:
            classes = rng.choice(len(MINI_CLASSES), batch, p=self.class_mix)
        ratio = np.where(rng.random(batch) < FULL_RATIO_FRACTION, 1.0, rng.uniform(0.05, 1.0, batch))
        ratio[rng.random(batch) < IDENTITY_FRACTION] = 0.0
        tiles = [self.crops[i, y : y + size, x : x + size] for i, y, x in zip(index, ys, xs)]
        clean = torch.stack([t.flip(1) if f else t for t, f in zip(tiles, flips)]).permute(0, 3, 1, 2).float() / 255
        generator = torch.Generator(self.device).manual_seed(int(rng.integers(0, 2**62)))
        ratio_t = torch.from_numpy(ratio).float()
        degraded = quantize(
            degrade(clean, MINI_CLASSES, torch.from_numpy(classes), ratio_t.to(self.device), generator, field)
        )
        ratios = torch.zeros(batch, len(MINI_CLASSES))
        ratios[torch.arange(batch), torch.from_numpy(classes)] = ratio_t
        return clean, degraded, ratios


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    crops = load_file(str(Path(args.data) / "crops.safetensors"))["images"]
    with safe_open(str(Path(args.data) / "heldout.safetensors"), framework="pt") as handle:
        held, held_names = handle.get_tensor("images"), json.loads(handle.metadata()["names"])
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {gpu}; {len(crops)} training crops; torch {torch.__version__}", flush=True)

    base, model, words = fresh_mini(args.seed, gated=args.gated_skip)
    if args.init:
        model, words = load_preset_weights(model, Path(args.init))
    if args.prediction == "residual_x0" and read_init_prediction(args.init) != "residual_x0":
        with torch.no_grad():  # the output is now Δ̂, zero-initialised: the identity is exact before training
            model.proj_out.weight.zero_()
            model.proj_out.bias.zero_()
    if args.output_conv and model.output_conv is None:
        model.enable_output_conv()
    start = FlowStart(alpha=args.alpha, beta=args.beta)
    model.to(device).train()
    codec = base.vae.to(device)
    encoder = LatentEncoder(codec, device)
    schedule = FlowSchedule.from_base(base)
    partition = partition_heads(model.config.num_attention_heads, len(MINI_CLASSES))
    prompts = PromptTable(dict(zip(all_prompts(MINI_CLASSES), words.encode(all_prompts(MINI_CLASSES)))), device)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    batches = Batches(crops, args.crop, args.batch, args.seed, device, args.class_weight)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    noise_generator = torch.Generator(device).manual_seed(args.seed) if device.type == "cuda" else None

    phases = args.phase or None
    total = sum(steps for _, _, steps in phases) if phases else (args.steps or 10**9)
    limit = None if total < 10**9 else args.minutes * 60
    calibrated_at_start = total < 10**9
    log = (out / "log.jsonl").open("w")
    window, losses, started, calibrated = [], [], time.perf_counter(), calibrated_at_start
    step = 0
    stop = min(total, args.stop_at or total)
    while step < stop:
        lr = _lr(step, total if calibrated else 10**6, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if phases:
            crop, batch, phase_index = phase_at(phases, step)
        else:
            final = calibrated and args.final_steps and step >= total - args.final_steps
            crop, batch, phase_index = (args.final_crop if final else args.crop), args.batch, int(bool(final))
        noise = field = None
        if args.couple_noise:  # the degradations' randomness is the flow's start noise ε (docs/mini.md)
            noise = torch.randn(
                (batch, codec.latent_channels, crop // 4, crop // 4), generator=step_generator(args.seed, step, 1)
            )
            field = torch.nn.functional.pixel_shuffle(noise, 4).to(device)
        clean, degraded, ratios = batches(step, crop, batch, field)
        dropped = condition_drop_mask(args.seed, step, batch, CONDITION_DROP)
        prompt_list, mask = batch_conditioning(ratios, dropped, MINI_CLASSES, partition)
        embeds, pooled = prompts.batch(prompt_list)
        clean_latents, target_latents = encoder.pair({"clean": clean * 2 - 1, "degraded": degraded * 2 - 1})
        with autocast:
            loss = flow_matching_loss(
                model,
                clean_latents,
                target_latents,
                embeds,
                pooled,
                mask.to(device),
                step_generator(args.seed, step, 0),
                schedule,
                noise_generator=None if noise is not None else noise_generator,
                start=start,
                prediction=args.prediction,
                noise=noise,
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        step += 1
        window.append(loss.detach())
        if phases and step < total and phase_at(phases, step)[2] != phase_index:
            save_ema(model, params, ema, words, out / f"phase{phase_index + 1}" / "preset", start, args.prediction)
        if step % args.log_every == 0 or step == total:
            mean = float(torch.stack(window).mean())
            window.clear()
            if not math.isfinite(mean):
                raise FloatingPointError(f"loss is {mean} at step {step}; lower --lr")
            elapsed = time.perf_counter() - started
            record = {
                "step": step,
                "loss": round(mean, 5),
                "lr": lr,
                "grad_norm": round(float(grad_norm), 4),
                "elapsed_s": round(elapsed, 2),
                "steps_per_s": round(step / elapsed, 3),
            }
            losses.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
        if not calibrated and step == CALIBRATION[0]:
            calibration_start = time.perf_counter()
        if not calibrated and step == CALIBRATION[1]:
            now = time.perf_counter()
            rate = (CALIBRATION[1] - CALIBRATION[0]) / (now - calibration_start)
            total = max(step + 1, int(step + (limit - (now - started)) * rate * 0.97))
            calibrated = True
            print(
                f"time limit {args.minutes} min at {rate:.2f} steps/s: {total} steps (reproduce with --steps {total})",
                flush=True,
            )
        if limit and time.perf_counter() - started > limit * 1.05:
            print(f"stopping at step {step}: past the time limit", flush=True)
            break
    elapsed = time.perf_counter() - started
    log.close()

    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    model.eval()
    training = {
        "script": "scripts/train_mini.py",
        "seed": args.seed,
        "steps": step,
        "batch": args.batch,
        "crop": args.crop,
        "final_crop": args.final_crop,
        "final_steps": args.final_steps,
        "phases": [list(phase) for phase in phases] if phases else None,
        "prediction": args.prediction,
        "output_conv": args.output_conv,
        "couple_noise": args.couple_noise,
        "class_weights": args.class_weight,
        "lr": args.lr,
        "ema": args.ema,
        "init": str(args.init) if args.init else None,
        "start": start.model_dump(),
        "device": gpu,
        "train_seconds": round(elapsed, 1),
        "torch": torch.__version__,
        "data_crops": len(crops),
        "held_out": held_names,
        "first_loss": losses[0]["loss"] if losses else None,
        "last_loss": losses[-1]["loss"] if losses else None,
    }
    fingerprints = save_preset(model.to("cpu").float(), words, out / "preset", training, start, args.prediction)
    sizes = preset_sizes(out / "preset")
    summary = {
        **training,
        "steps_per_s": round(step / elapsed, 3),
        "fingerprints": fingerprints,
        "preset_bytes": sum(sizes.values()),
        "files": sizes,
    }
    summary.update(sanity(out, held, held_names, args.sanity_steps, device, start))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=2))
    for name, size in sizes.items():
        print(f"  {size / 1e6:8.2f} MB  preset/{name}")


def phase_at(phases: list[tuple[int, int, int]], step: int) -> tuple[int, int, int]:
    """(crop, batch, phase index) of `step` under `--phase CROP:BATCH:STEPS` phases run in order."""
    end = 0
    for index, (crop, batch, steps) in enumerate(phases):
        end += steps
        if step < end:
            return crop, batch, index
    return phases[-1][0], phases[-1][1], len(phases) - 1


def parse_class_weights(text: str) -> dict[str, float]:
    """`rain=3,haze=1` -> {"rain": 3.0, "haze": 1.0}: mini's classes, positive weights (unnamed classes weigh 1)."""
    weights = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--class-weight {text!r}: expected NAME=WEIGHT[,...]") from None
        if name not in MINI_CLASSES or not weights[name] > 0:
            raise argparse.ArgumentTypeError(
                f"--class-weight {text!r}: {name!r} must be one of {', '.join(MINI_CLASSES)} with a weight > 0"
            )
    return weights


def parse_phase(text: str) -> tuple[int, int, int]:
    """`CROP:BATCH:STEPS` -> (crop, batch, steps); the crop a multiple of 8."""
    try:
        crop, batch, steps = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--phase {text!r}: expected CROP:BATCH:STEPS, e.g. 128:16:400") from None
    if crop % 8 or crop > CROP or min(crop, batch, steps) <= 0:
        raise argparse.ArgumentTypeError(
            f"--phase {text!r}: crop a positive multiple of 8 up to {CROP}, batch and steps positive"
        )
    return crop, batch, steps


def save_ema(model, params, ema, words, folder: Path, start: FlowStart, prediction: str) -> None:
    """Write the EMA weights as a preset folder (a phase's checkpoint), then restore the live weights."""
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
        save_preset(
            copy.deepcopy(model).to("cpu").float(), words, folder, {"checkpoint": str(folder)}, start, prediction
        )
        for p, value in zip(params, live):
            p.copy_(value)
    print(f"checkpoint: {folder}", flush=True)


def widen_output(model, state: dict[str, torch.Tensor]) -> None:
    """Fit an --init preset's output layer (and output convolution) with C channels into a model with 2C (the
    gated skip): the old weights give Δ̂, the new gate channels start at zero (g = 0: the same x̂0)."""
    narrow, wide = MINI_TRANSFORMER["out_channels"], model.out_channels
    if wide == narrow or state["proj_out.weight"].shape[0] == model.proj_out.weight.shape[0]:
        return
    for name in ("proj_out.weight", "proj_out.bias"):
        old = state[name]
        new = torch.zeros((old.shape[0] // narrow, wide, *old.shape[1:]))
        new[:, :narrow] = old.unflatten(0, (-1, narrow))
        state[name] = new.flatten(0, 1)
    if "output_conv.weight" in state:
        weight, bias = torch.zeros_like(model.output_conv.weight), torch.zeros_like(model.output_conv.bias)
        weight[:narrow, :narrow], bias[:narrow] = state["output_conv.weight"], state["output_conv.bias"]
        state["output_conv.weight"], state["output_conv.bias"] = weight, bias


def read_init_prediction(preset: Path | None) -> str | None:
    """The prediction recorded by an `--init` preset's adapter config (None without --init)."""
    from mdsd3_cli.model.adapter import read_adapter_config

    return None if preset is None else read_adapter_config(Path(preset) / "adapter").prediction


def load_preset_weights(model, preset: Path):
    """`model` (a fresh mini) with the weights of a trained preset folder (`--init`: training continues from
    it), and that preset's word vectors."""
    from safetensors.torch import load_file

    from mdsd3_cli.model.adapter import read_adapter_config
    from mdsd3_cli.model.prompts import WordTextEncoder

    if read_adapter_config(preset / "adapter").output_conv:
        model.enable_output_conv()
    state = {
        name: tensor.float()
        for name, tensor in load_file(
            str(preset / "base" / "transformer" / "diffusion_pytorch_model.safetensors")
        ).items()
    }
    state.update(
        {name: tensor.float() for name, tensor in load_file(str(preset / "adapter" / "adapter.safetensors")).items()}
    )
    widen_output(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {name for name, _ in model.named_buffers()}  # fixed (sin-cos positions): not stored in the adapter
    missing = [name for name in missing if name not in buffers]
    if missing or unexpected:
        raise SystemExit(
            f"--init {preset}: weights do not fit mini: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model, WordTextEncoder.load(preset / "base" / "text_encoder")


def sanity(out: Path, held: torch.Tensor, names: list[str], steps: int, device: torch.device, start: FlowStart) -> dict:
    """Held-out photos through the saved preset (loaded as users load it): sheets + identity PSNR."""
    from PIL import Image

    from mdsd3_cli.model.prompts import load_prompt_embeddings
    from mdsd3_cli.model.sampler import SampleRequest
    from mdsd3_cli.model.weights import build_model, load_base

    base = load_base(str(out / "preset" / "base"), device=device)
    model, config = build_model(base, out / "preset" / "adapter")
    model.to(device).eval()
    embeddings = load_prompt_embeddings(
        str(out / "preset" / "base"), base.fingerprint, all_prompts(config.classes), out / "prompt_cache"
    )
    settings = PreviewSettings(images=len(held), steps=steps, guidance=1.0, start=start)
    pipeline = preview_pipeline(base, model, config, embeddings, settings)
    render_preview(pipeline, held, config.classes, settings).save(out / "sanity.png")
    sampler = pipeline.sampler
    rows = []
    for name in config.classes:
        requests = [SampleRequest({name: r} if r else {}, settings.seed, start.alpha, start.beta) for r in RATIO_SWEEP]
        images = sampler.generate(
            held[:1].expand(len(requests), -1, -1, -1), requests, settings.steps, settings.guidance
        )
        rows.append(np.concatenate(list(images), axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(out / "sanity_ratios.png")
    identity = sampler.generate(
        held,
        [SampleRequest({}, settings.seed + i, start.alpha, start.beta) for i in range(len(held))],
        settings.steps,
        settings.guidance,
    )
    mse = ((identity.astype(np.float64) - held.numpy().astype(np.float64)) ** 2).reshape(len(held), -1).mean(axis=1)
    psnr = [round(float(10 * np.log10(255**2 / max(m, 1e-10))), 2) for m in mse]
    print(
        f"sanity: {out / 'sanity.png'}, {out / 'sanity_ratios.png'} (rows {config.classes}, "
        f"columns ratio {list(RATIO_SWEEP)}, image {names[0]}); identity PSNR {dict(zip(names, psnr))}"
    )
    return {"identity_psnr_db": dict(zip(names, psnr))}


# ---------------------------------------------------------------------------------------------- install step


def install(preset: Path) -> None:
    """Copy a trained preset folder into mdsd3_cli/model/presets/mini/ and verify its fingerprints there."""
    from mdsd3_cli.model.presets import preset_folder
    from mdsd3_cli.model.weights import build_model, fingerprint_adapter, fingerprint_base, load_base

    expected = json.loads((preset / "fingerprints.json").read_text())
    target = preset_folder("mini")
    for part in ("base", "adapter"):
        shutil.rmtree(target / part, ignore_errors=True)
        shutil.copytree(preset / part, target / part)
    shutil.copy2(preset / "fingerprints.json", target / "fingerprints.json")
    found = {"base": fingerprint_base("mini"), "adapter": fingerprint_adapter(target / "adapter")}
    build_model(load_base("mini"), target / "adapter")  # loads as `model.base: mini, model.adapter: mini` will
    if found != expected:
        raise SystemExit(f"fingerprints differ after copying: expected {expected}, found {found}")
    total = sum(preset_sizes(target).values())
    print(f"installed {preset} -> {target} ({total / 1e6:.1f} MB); fingerprints {found} verified")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write the training crops and held-out images (CPU, needs scikit-image)")
    data.add_argument("--out", type=Path, default=ROOT / "out" / "mini_data")
    data.add_argument("--count", type=int, default=CROPS, help=f"number of {CROP}-px crops")
    data.add_argument("--seed", type=int, default=0)
    run = sub.add_parser("train", help="train, write OUT/preset, the log and sanity sheets")
    run.add_argument("--data", type=Path, default=ROOT / "out" / "mini_data")
    run.add_argument("--out", type=Path, default=ROOT / "out" / "mini_run")
    run.add_argument("--minutes", type=float, default=7.0, help="training time (the step count is fitted to it)")
    run.add_argument("--steps", type=int, default=None, help="fixed step count (overrides --minutes)")
    run.add_argument("--batch", type=int, default=128)
    run.add_argument("--crop", type=int, default=MINI_RESOLUTION, help="training crop size (a multiple of 8)")
    run.add_argument(
        "--final-crop",
        type=int,
        default=MINI_RESOLUTION,
        help="crop size of the last --final-steps steps (train small, finish at the demo size)",
    )
    run.add_argument("--final-steps", type=int, default=0, help="steps at --final-crop at the end (needs --steps)")
    run.add_argument("--lr", type=float, default=3e-4)
    run.add_argument("--warmup", type=int, default=200)
    run.add_argument("--ema", type=float, default=0.999)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--log-every", type=int, default=50)
    run.add_argument(
        "--alpha", type=float, default=1.0, help="flow start z_T = alpha*noise + beta*clean (docs/METHOD.md §3)"
    )
    run.add_argument("--beta", type=float, default=0.0, help="see --alpha; mini v2: --alpha 0.3 --beta 1.0")
    run.add_argument(
        "--init",
        type=Path,
        default=None,
        help="continue from a trained preset folder (e.g. mdsd3_cli/model/presets/mini) instead of random weights",
    )
    run.add_argument(
        "--phase",
        type=parse_phase,
        action="append",
        default=None,
        metavar="CROP:BATCH:STEPS",
        help="a training phase, repeatable, run in order (replaces --steps/--crop/--final-*); the EMA "
        "is saved as OUT/phaseN/preset after each phase but the last",
    )
    run.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="stop at this step, the schedule (learning rate, phases) still that of the full run",
    )
    run.add_argument(
        "--prediction",
        choices=("velocity", "residual_x0"),
        default="velocity",
        help="what the model outputs: the flow velocity, or Δ̂ with x̂0 = clean + Δ̂ (mini v3; "
        "a velocity --init gets a zero-initialised output layer)",
    )
    run.add_argument(
        "--gated-skip",
        action="store_true",
        help="twice the output channels: x̂0 = clean + Δ̂ + g·(x_t − clean) (mini v3; needs residual_x0)",
    )
    run.add_argument(
        "--output-conv", action="store_true", help="add the zero-initialised residual 3x3 output convolution (mini v3)"
    )
    run.add_argument(
        "--couple-noise",
        action="store_true",
        help="draw the degradations' per-pixel randomness (rain drops, noise) from the flow's start noise",
    )
    run.add_argument(
        "--class-weight",
        type=parse_class_weights,
        default=None,
        metavar="NAME=W[,...]",
        help="how often each class is drawn, relative (default: all equal); e.g. rain=3 (mini v4)",
    )
    run.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is present")
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default torch's); 1 is much faster on cores shared with other jobs",
    )
    run.add_argument("--sanity-steps", type=int, default=10, help="sampler steps of the sanity sheets")
    run.add_argument(
        "--quick",
        action="store_true",
        help="pipeline check on a CPU in about two minutes: 30 steps, batch 4, 32-px crops, 2 sanity steps",
    )
    inst = sub.add_parser("install", help="copy a trained preset into mdsd3_cli/model/presets/mini and verify it")
    inst.add_argument("--preset", type=Path, default=ROOT / "out" / "mini_run" / "preset")
    args = parser.parse_args(argv)
    if args.command == "train" and not args.quick and not args.steps and not args.phase and not args.minutes > 0:
        parser.error("give --minutes > 0, --steps or --phase")
    if args.command == "train" and args.gated_skip and args.prediction != "residual_x0":
        parser.error("--gated-skip needs --prediction residual_x0")
    if args.command == "train" and args.final_steps and not args.steps:
        parser.error("--final-steps needs --steps (the phase starts at steps - final_steps)")
    if args.command == "data":
        make_data(args.out, args.count, args.seed)
    elif args.command == "install":
        install(args.preset)
    else:
        if args.quick:
            args.steps, args.batch, args.crop, args.warmup, args.log_every, args.sanity_steps = 30, 4, 32, 10, 10, 2
            if args.phase:
                args.phase = [(32, 4, 15), (64, 2, 15)]
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
