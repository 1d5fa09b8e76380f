"""`mdsd3 train`: checkpoints and exact resumes, signals, trainable sets, adapter export, and learning.

Everything runs on the CPU with the tiny preset and synthetic pairs made from the photos in examples/photos
(scripts/make_synthetic_pairs.py: haze = blend toward white, noise = additive Gaussian).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from mdsd3_cli.model.heads import all_prompts
from mdsd3_cli.model.prompts import PromptCache, load_prompt_embeddings, tiny_text_encoder
from mdsd3_cli.model.sampler import MDSD3Sampler, SampleRequest
from mdsd3_cli.model.weights import (
    SD3_SCHEDULER,
    TINY_SEED,
    build_model,
    build_tiny,
    fingerprint_folder,
    fresh_adapter_config,
    load_base,
)
from mdsd3_cli.recipe.train import load_train_recipe
from mdsd3_cli.train.checkpoints import CHECKPOINTS, list_checkpoints
from mdsd3_cli.train.data import EmptyDatasetError
from mdsd3_cli.train.errors import TrainError
from mdsd3_cli.train.previews import PreviewSettings
from mdsd3_cli.train.run import compute_loss, open_training, plan_training, run_train, train
from mdsd3_cli.train.step import FlowSchedule, is_trainable, step_generator

from .helpers import REPO, count_decodes, mdsd3

TINY_CONFIG = REPO / "configs" / "train_tiny.yaml"
PHOTOS = REPO / "examples" / "photos"
HAZE, NOISE_SIGMA, RES = 0.85, 60.0, 128  # the values configs/train_tiny.yaml documents
FOLDERS = {"haze": "haze", "haze_half": "haze_half", "noise": "noise", "noise_half": "noise_half"}


def _synthetic_module():
    spec = importlib.util.spec_from_file_location("make_synthetic_pairs", REPO / "scripts" / "make_synthetic_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """clean/ haze/ noise/ haze_half/ noise_half/ at short side RES from the six repo photos."""
    out = tmp_path_factory.mktemp("pairs")
    assert _synthetic_module().make_pairs(PHOTOS, out, size=RES, haze_amount=HAZE, noise_sigma=NOISE_SIGMA) == 6
    return out


def tiny_overrides(pairs: Path, out: Path, *extra: str) -> list[str]:
    """configs/train_tiny.yaml pointed at `pairs` and `out`."""
    sets = []
    for name, folder in FOLDERS.items():
        sets += [f"datasets.{name}.clean={pairs / 'clean'}", f"datasets.{name}.degraded={pairs / folder}"]
    return [*sets, f"output.dir={out}", *extra]


# Small and quick: random crops (so no latent cache), identity and condition drop both frequent, grad accumulation.
QUICK = (
    "data.resolution=32",
    "data.random_crop=true",
    "data.cache_latents=false",
    "data.identity_fraction=0.3",
    "data.condition_drop=0.3",
    "train.batch_size=2",
    "train.grad_accum=2",
    "train.warmup_steps=2",
    "output.log_every=1",
    "output.checkpoint_every=2",
    "output.keep_checkpoints=2",
    "output.preview_every=3",
)


def quick_recipe(pairs: Path, out: Path, *extra: str):
    return load_train_recipe(TINY_CONFIG, tiny_overrides(pairs, out, *QUICK, *extra))


def log_losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


# ---------------------------------------------------------------- checkpoints, resume, export


@pytest.fixture(scope="module")
def uninterrupted(pairs, tmp_path_factory) -> Path:
    """Six steps, checkpoints every two (the last two kept), previews every three."""
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = run_train(quick_recipe(pairs, out, "train.steps=6"))
    assert (summary.end_step, summary.exit_code, summary.adapter_dir) == (6, 0, out / "adapter")
    return out


def test_checkpoints_hold_only_the_adapter_and_rotate(uninterrupted):
    assert [step for step, _ in list_checkpoints(uninterrupted)] == [4, 6]
    assert sorted(p.name for p in (uninterrupted / CHECKPOINTS).iterdir()) == ["step-000004", "step-000006"]
    folder = uninterrupted / CHECKPOINTS / "step-000006"
    names = {p.name for p in folder.iterdir()}
    assert {"adapter", "trainer_state.json", "optimizer.bin", "scheduler.bin"} <= names
    assert not any(name.startswith("model") for name in names), names  # no 2B-parameter base in a checkpoint
    state = json.loads((folder / "trainer_state.json").read_text())
    assert (state["step"], state["data_step"], state["classes"]) == (6, 12, ["haze", "noise"])
    tensors = load_file(str(folder / "adapter" / "adapter.safetensors"))
    assert all(k.startswith(("clean_pos_embed.", "clean_blocks.")) or "lora_" in k for k in tensors)
    assert sorted(p.name for p in (uninterrupted / "previews").iterdir()) == ["step-000003.png", "step-000006.png"]
    grid = Image.open(uninterrupted / "previews" / "step-000006.png")
    assert grid.width == 32 * 4  # clean | haze | noise | haze+noise
    rows = [json.loads(line) for line in (uninterrupted / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "grad_norm", "elapsed"} <= set(row) for row in rows)
    assert rows[0]["lr"] < rows[-1]["lr"] == 3e-3  # warmup


def test_training_previews_average_over_their_grid_shifts(pairs, tmp_path, monkeypatch):
    """Previews are sampled by the pipeline with the grid shifts they are given (the trainer built its own sampler
    on one grid, dropping them)."""
    offsets, original = [], MDSD3Sampler.generate

    def spy(self, *args, **kwargs):
        offsets.append(self.offsets)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MDSD3Sampler, "generate", spy)
    recipe = quick_recipe(pairs, tmp_path / "out", "train.steps=1", "output.preview_every=1")
    run_train(recipe, preview=PreviewSettings(images=1, steps=1, grid_shifts=2))
    assert (tmp_path / "out" / "previews" / "step-000001.png").is_file()
    assert offsets and all(len(grid) == 2 for grid in offsets)


def test_resume_reproduces_the_uninterrupted_losses_exactly(uninterrupted, pairs, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(uninterrupted / CHECKPOINTS / "step-000004", out / CHECKPOINTS / "step-000004")
    summary = run_train(quick_recipe(pairs, out, "train.steps=6"), resume="latest")
    assert (summary.start_step, summary.end_step) == (4, 6)
    reference = log_losses(uninterrupted)
    assert log_losses(out) == {5: reference[5], 6: reference[6]}  # bit-identical floats
    mine, theirs = (load_file(str(p / "adapter" / "adapter.safetensors")) for p in (out, uninterrupted))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_exported_adapter_loads_and_samples(uninterrupted, fresh_base):
    model, config = build_model(fresh_base, uninterrupted / "adapter")
    assert config.classes == ["haze", "noise"] and config.lora_rank == 4 and config.training["steps"] == 6
    prompts = load_prompt_embeddings("tiny", fresh_base.fingerprint, all_prompts(config.classes))
    pixels = torch.from_numpy(np.asarray(Image.open(PHOTOS / "rocket.jpg").convert("RGB"))[:32, :32].copy())[None]
    out = MDSD3Sampler(fresh_base, model, config, prompts).generate(pixels, [SampleRequest({"haze": 1.0}, 1)], 2, 2.0)
    assert out.shape == (1, 32, 32, 3) and out.dtype == np.uint8


def test_training_continues_from_an_adapter(uninterrupted, pairs, tmp_path):
    recipe = quick_recipe(pairs, tmp_path, "train.steps=1", f"model.adapter={uninterrupted / 'adapter'}")
    with open_training(plan_training(recipe)) as state:
        exported = load_file(str(uninterrupted / "adapter" / "adapter.safetensors"))
        params = dict(state.unwrapped.named_parameters())
        assert all(torch.equal(params[name], tensor) for name, tensor in exported.items())
        assert train(state).exit_code == 0


def test_fresh_start_into_a_run_with_checkpoints_is_refused(uninterrupted, pairs):
    with pytest.raises(TrainError, match="--resume latest"):
        plan_training(quick_recipe(pairs, uninterrupted, "train.steps=6"))


def test_finished_run_resumes_to_nothing(uninterrupted, pairs, tmp_path):
    out = tmp_path / "done"
    shutil.copytree(uninterrupted, out)
    summary = run_train(quick_recipe(pairs, out, "train.steps=6"), resume="latest")
    assert (summary.start_step, summary.end_step, summary.exit_code) == (6, 6, 0)
    assert log_losses(out) == log_losses(uninterrupted)


def test_empty_dataset_fails_before_any_model_loads(pairs, tmp_path, monkeypatch):
    import mdsd3_cli.train.run as train_module

    monkeypatch.setattr(train_module, "load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = load_train_recipe(TINY_CONFIG, tiny_overrides(pairs, tmp_path / "out", f"datasets.noise.degraded={empty}"))
    with pytest.raises(EmptyDatasetError, match="'noise'"):
        plan_training(recipe)


def test_latent_cache_with_random_crops_is_refused(pairs, tmp_path):
    recipe = load_train_recipe(TINY_CONFIG, tiny_overrides(pairs, tmp_path, "data.random_crop=true"))
    with pytest.raises(TrainError, match="cache_latents"):
        plan_training(recipe)


def test_train_refuses_a_foreign_folder_and_its_own_dataset(pairs, tmp_path):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="non-empty folder that training did not write"):
        plan_training(quick_recipe(pairs, foreign))
    inside = pairs / "clean" / "run"  # previews there would become clean images of the next run
    with pytest.raises(TrainError, match="overlaps the training data"):
        plan_training(quick_recipe(pairs, inside))
    assert os.listdir(foreign) == ["notes.txt"] and not inside.exists()


# ---------------------------------------------------------------- latent cache

CACHE_RUN = (
    "data.random_crop=false",
    "data.identity_fraction=0.3",
    "train.batch_size=8",
    "train.grad_accum=1",
    "train.steps=5",
    "output.preview_every=0",
    "output.checkpoint_every=5",
)


def test_cached_latents_train_the_same_adapter_decoding_each_image_once(pairs, tmp_path, monkeypatch):
    """data.cache_latents changes what is decoded, never what is learned: the cache (loader in this process, or
    two worker processes) and no cache train the same adapter to the bit, and with the cache an image file is
    decoded once per flip instead of once per sample."""
    decodes = count_decodes(monkeypatch)
    runs = {}
    for name, cache, workers in (("plain", "false", 0), ("cached", "true", 0), ("workers", "true", 2)):
        decodes.clear()
        out = tmp_path / name
        summary = run_train(
            quick_recipe(pairs, out, *CACHE_RUN, f"data.cache_latents={cache}", f"data.workers={workers}")
        )
        assert summary.exit_code == 0
        runs[name] = (load_file(str(out / "adapter" / "adapter.safetensors")), log_losses(out), Counter(decodes))
    plain_adapter, plain_losses, plain_decodes = runs["plain"]
    for name in ("cached", "workers"):
        adapter, losses = runs[name][:2]
        assert losses == plain_losses, name
        assert adapter.keys() == plain_adapter.keys(), name
        assert all(torch.equal(adapter[key], plain_adapter[key]) for key in plain_adapter), name
    cached_decodes = runs["cached"][2]
    assert max(plain_decodes.values()) > 4  # 40 samples: each clean photo is in about a sixth of them
    assert set(cached_decodes) <= set(plain_decodes) and max(cached_decodes.values()) <= 2, cached_decodes


# ---------------------------------------------------------------- trainable sets


@pytest.mark.parametrize("trainable", ["default", "lora_only"])
def test_only_the_intended_parameters_train(trainable, pairs, tmp_path):
    recipe = quick_recipe(pairs, tmp_path, "train.steps=2", "output.preview_every=0", f"train.trainable={trainable}")
    with open_training(plan_training(recipe)) as state:
        model = state.unwrapped
        intended = {name for name, _ in model.named_parameters() if is_trainable(name, trainable)}
        if trainable == "default":
            assert any(".to_q." in n for n in intended) and any(".ff." in n for n in intended)
        else:
            assert all("lora_" in n or ".z_" in n for n in intended)
        assert any("lora_" in n for n in intended) and any(".z_" in n for n in intended)
        frozen = {name: p.detach().clone() for name, p in model.named_parameters() if name not in intended}
        frozen.update({f"vae.{k}": v.clone() for k, v in state.base.vae.state_dict().items()})
        start = {name: p.detach().clone() for name, p in model.named_parameters() if name in intended}

        loss = compute_loss(state, 0, state.dataset.sample_batch(0, 2))
        loss.backward()
        graded = {name for name, p in model.named_parameters() if p.grad is not None}
        assert graded == intended
        assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if name in intended)
        model.zero_grad(set_to_none=True)

        train(state)
        after = dict(model.named_parameters())
        assert all(torch.equal(after[name], before) for name, before in frozen.items() if not name.startswith("vae."))
        assert all(
            torch.equal(state.base.vae.state_dict()[k[4:]], v) for k, v in frozen.items() if k.startswith("vae.")
        )
        assert any(not torch.equal(after[name], before) for name, before in start.items())
    saved = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert not any(
        name.startswith(("transformer_blocks.", "pos_embed.", "proj_out.", "norm_out.")) and "lora_" not in name
        for name in saved
    )


# ---------------------------------------------------------------- CLI: SIGUSR1 and generate


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mdsd3_cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_sigusr1_saves_a_checkpoint_and_the_cli_resumes(uninterrupted, pairs, tmp_path):
    out = tmp_path / "preempted"

    def train_args(steps: int, *extra: str) -> list[str]:
        sets = tiny_overrides(
            pairs, out, *QUICK, f"train.steps={steps}", "output.checkpoint_every=100000", "output.preview_every=0"
        )
        return ["train", "--config", str(TINY_CONFIG), *(arg for item in sets for arg in ("--set", item)), *extra]

    process = _cli(*train_args(100000))
    deadline = time.monotonic() + 600  # a loaded machine starts slowly
    while not ((out / "log.jsonl").is_file() and len((out / "log.jsonl").read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)  # what scripts/slurm_train.sbatch forwards before the time limit
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 138, output
    ((stopped, folder),) = list_checkpoints(out)
    assert stopped >= 2 and json.loads((folder / "trainer_state.json").read_text())["step"] == stopped
    assert not (out / "adapter").exists()
    # the CLI computes what the library computed (fresh LoRA initialisation included)
    reference = log_losses(uninterrupted)
    assert {s: v for s, v in log_losses(out).items() if s <= 6} == {
        s: reference[s] for s in range(1, min(stopped, 6) + 1)
    }

    resumed = _cli(*train_args(stopped + 1, "--resume", "latest"))
    output = resumed.communicate(timeout=180)[0]
    assert resumed.returncode == 0, output
    assert max(log_losses(out)) == stopped + 1 and (out / "adapter" / "adapter.safetensors").is_file()
    assert f"resumed from {folder}" in output.replace("\n", "")


def test_generate_uses_the_trained_adapter(uninterrupted, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("rocket.jpg", "coffee.jpg"):
        shutil.copy(PHOTOS / name, photos / name)
    recipe = {
        "model": {"base": "tiny", "adapter": str(uninterrupted / "adapter")},
        "input": {"paths": [str(photos)], "size": 32},
        "output": {"dir": str(tmp_path / "generated")},
        "sampling": {"steps": 2, "guidance": 2.0, "alpha": 1.0, "beta": 0.3, "batch_size": 2},
        "variants": [
            {"name": "haze", "classes": {"haze": 1.0}},
            {"name": "mix", "classes": {"haze": 0.5, "noise": 1.0}},
        ],
    }
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = mdsd3("generate", "--config", str(path))  # in process: no interpreter start-up
    assert result.exit_code == 0, (result.output, result.exception)
    lines = [
        json.loads(line)
        for f in (tmp_path / "generated" / "manifest").glob("*.jsonl")
        for line in f.read_text().splitlines()
    ]
    assert len(lines) == 4
    assert {Path(line["degraded"]).parts[-2] for line in lines} == {"haze", "mix"}


# ---------------------------------------------------------------- learning

PRETRAIN_STEPS = 400  # the tiny base as a denoiser (see pretrain_tiny_base)
ADAPTER_STEPS = 800  # = train.steps of configs/train_tiny.yaml
ALPHA, BETA, SAMPLE_STEPS, GUIDANCE = 1.0, 0.0, 8, 3.0  # plain SD3 start; guidance as in the preview grids
MARGIN, BETWEEN = 0.05, 0.02  # seen (1 and 2 threads, identical): >= 0.32, >= 0.10


def pretrain_tiny_base(pairs: Path, root: Path, cache_dir: Path, steps: int, lr: float = 3e-3, batch: int = 16) -> Path:
    """The tiny preset's transformer, trained briefly as a class-conditional SD3 flow model on the pair images,
    saved as a diffusers SD3 folder (transformer/, vae/, scheduler/) with its prompts in `cache_dir`.

    Why: MDSD3 trains an adapter on a FROZEN base that already knows how to denoise images (SD3). The tiny
    preset's random transformer cannot denoise, and no adapter can teach it to (the adapter only adds to the
    attention of a frozen network), so on a random base the generated latents stay noise whatever the training.
    The VAE and text encoders stay the tiny preset's random ones.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = build_tiny()
    vae, model = base.vae, base.transformer
    prompts = {"clean": "clean", "haze": "haze", "haze_half": "haze", "noise": "noise", "noise_half": "noise"}
    embeddings = load_prompt_embeddings("tiny", base.fingerprint, sorted({*prompts.values(), ""}), cache_dir)
    latents, labels = [], []
    with torch.no_grad():
        for folder, prompt in prompts.items():
            pixels = torch.stack([_pixels(p) for p in sorted((pairs / folder).glob("*.png"))])
            pixels = torch.cat([pixels, pixels.flip(-1)]).permute(0, 3, 1, 2).float() / 127.5 - 1
            latent = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
            latents.append(latent)
            labels += [prompt] * len(latent)
    latents = torch.cat(latents)
    schedule = FlowSchedule.from_base(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        generator = step_generator(12345, step, 0)
        index = torch.randint(0, len(latents), (batch,), generator=generator)
        drop = torch.rand(batch, generator=generator) < 0.1
        names = ["" if d else labels[i] for i, d in zip(index.tolist(), drop.tolist())]
        x0 = latents[index]
        sigma, timestep = schedule.draw(batch, generator, 0.0, 1.0)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        prediction = model(
            hidden_states=noisy,
            timestep=timestep,
            return_dict=False,
            encoder_hidden_states=torch.stack([embeddings[n].embeds for n in names]),
            pooled_projections=torch.stack([embeddings[n].pooled for n in names]),
        )[0]
        loss = ((prediction - (noise - x0)) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    model.eval()
    model.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER).save_pretrained(root / "scheduler")
    PromptCache(cache_dir, fingerprint_folder(root)).get(
        all_prompts(["haze", "noise"]), lambda: tiny_text_encoder(TINY_SEED)
    )
    return root


def _pixels(path: Path, size: int = 128) -> torch.Tensor:
    """The centre crop the trainer uses (no random crop): uint8 [size, size, 3]."""
    array = np.asarray(Image.open(path).convert("RGB"))
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return torch.from_numpy(array[top : top + size, left : left + size].copy())


def dc(latents: torch.Tensor) -> torch.Tensor:
    """Per-channel spatial means [B, 16]: the latent-space analogue of brightness/colour.

    The tiny preset's VAE is random, so decoded pixels mean nothing: every check is made on latents. The
    per-channel means separate clean, hazy and noisy latents of these photos, and are insensitive to the
    zero-mean residual noise that the tiny base leaves in its samples.
    """
    return latents.float().mean(dim=(2, 3))


def coordinate(latents: torch.Tensor, clean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per image: where the statistic lies on the line clean (0) -> degraded target (1); above 0.5 means closer to
    the target than to the clean input, below 0.5 closer to the clean input."""
    axis = dc(target) - dc(clean)
    return ((dc(latents) - dc(clean)) * axis).sum(dim=1) / (axis * axis).sum(dim=1)


def test_training_learns_the_classes(pairs, tmp_path):
    """Train configs/train_tiny.yaml (on a briefly pretrained tiny base, see `pretrain_tiny_base`), generate
    from the clean photos, and compare the generated latents with the VAE latents of the targets."""
    cache = tmp_path / "prompt_cache"
    started = time.perf_counter()
    base_dir = pretrain_tiny_base(pairs, tmp_path / "base", cache, steps=PRETRAIN_STEPS)
    pretrain_s = time.perf_counter() - started
    out = tmp_path / "run"
    recipe = load_train_recipe(
        TINY_CONFIG,
        tiny_overrides(
            pairs,
            out,
            f"model.base={base_dir}",
            f"model.prompt_cache={cache}",
            "output.preview_every=0",
            f"train.steps={ADAPTER_STEPS}",
        ),
    )
    summary = run_train(recipe)
    train_s = time.perf_counter() - started - pretrain_s
    assert summary.exit_code == 0 and summary.last_loss < summary.first_loss
    print(
        f"pretrain {pretrain_s:.0f}s, adapter {train_s:.0f}s, loss {summary.first_loss:.3f} -> {summary.last_loss:.3f}"
    )

    trainer_base = load_base(str(base_dir))
    clean = torch.stack([_pixels(p) for p in sorted((pairs / "clean").glob("*.png"))])
    results = {}
    for name, adapter in (("trained", out / "adapter"), ("fresh", None)):
        if adapter is None:
            model, config = build_model(trainer_base, config=fresh_adapter_config(trainer_base, ["haze", "noise"], 4))
        else:
            model, config = build_model(trainer_base, adapter)
        prompts = load_prompt_embeddings(str(base_dir), trainer_base.fingerprint, all_prompts(config.classes), cache)
        sampler = MDSD3Sampler(trainer_base, model, config, prompts)
        targets = {
            k: sampler.encode(torch.stack([_pixels(p) for p in sorted((pairs / k).glob("*.png"))]))
            for k in ("clean", "haze", "noise")
        }
        generated = {}
        labels = [
            ("empty", {}),
            ("haze", {"haze": 1.0}),
            ("haze_half", {"haze": 0.5}),
            ("noise", {"noise": 1.0}),
            ("noise_half", {"noise": 0.5}),
        ]
        for label, ratios in labels if adapter is not None else labels[:1]:  # the fresh adapter: only its empty set
            requests = [SampleRequest(ratios, seed=100 + i, alpha=ALPHA, beta=BETA) for i in range(len(clean))]
            generated[label] = sampler.generate(clean, requests, steps=SAMPLE_STEPS, guidance=GUIDANCE, output="latent")
        results[name] = (targets, generated)
        for label, latents in generated.items():
            coords = {c: coordinate(latents, targets["clean"], targets[c]).mean().item() for c in ("haze", "noise")}
            dists = {k: (dc(latents) - dc(v)).norm(dim=1).mean().item() for k, v in targets.items()}
            print(name, label, {k: round(v, 3) for k, v in coords.items()}, {k: round(v, 3) for k, v in dists.items()})

    targets, generated = results["trained"]

    def coord(label: str, cls: str) -> float:
        return coordinate(generated[label], targets["clean"], targets[cls]).mean().item()

    for cls in ("haze", "noise"):
        assert coord(cls, cls) > 0.5 + MARGIN, cls  # closer to its target
        assert coord("empty", cls) < 0.5 - MARGIN, cls  # empty set: closer to clean
    # Ratio 0.5 between 0 and 1, checked for haze: the statistic scales with haze strength, whereas for noise
    # it saturates (the half-sigma target itself sits at ~0.8 of the way), so "between" is not resolvable there.
    assert coord("empty", "haze") + BETWEEN < coord("haze_half", "haze") < coord("haze", "haze") - BETWEEN
    # Learned, not inherited from the base: with an untrained adapter the empty class set lands much further
    # from the clean input.
    fresh_targets, fresh_generated = results["fresh"]
    trained_gap = (dc(generated["empty"]) - dc(targets["clean"])).norm(dim=1).mean()
    fresh_gap = (dc(fresh_generated["empty"]) - dc(fresh_targets["clean"])).norm(dim=1).mean()
    assert trained_gap < 0.8 * fresh_gap


def test_a_full_disk_at_a_checkpoint_is_one_clear_error_and_a_second_trainer_is_refused(pairs, tmp_path, monkeypatch):
    from mdsd3_cli.dataset.ownership import ShardBusyError

    recipe = quick_recipe(pairs, tmp_path, "train.steps=2", "output.preview_every=0")

    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with open_training(plan_training(recipe)) as state:
        with pytest.raises(ShardBusyError, match=f"PID {os.getpid()}"):  # one training process per output folder
            with open_training(plan_training(recipe)):
                pytest.fail("a second run opened the locked output folder")
        monkeypatch.setattr(torch, "save", disk_full)
        with pytest.raises(TrainError, match="cannot write checkpoint .*step-000002.*--resume latest"):
            train(state)
    assert not list((tmp_path / CHECKPOINTS).iterdir())
    monkeypatch.undo()
    with open_training(plan_training(recipe)):  # the block's end released the lock
        pass
