"""`train.start`: training an adapter for the noise equation's start z_T = α·ε + β·z_clean (docs/METHOD.md §4).

The loss with the default start is diffusers' to the bit; another start changes the flow's source; the exported
adapter records its start; `check` and `generate` warn when a recipe samples from another one; and an adapter
trained for a start near the clean image reproduces it (identity) better in 2 sampling steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from mdsd3_cli.model.adapter import CONFIG_NAME, FlowStart, read_adapter_config
from mdsd3_cli.model.heads import all_prompts, head_mask
from mdsd3_cli.model.prompts import load_prompt_embeddings
from mdsd3_cli.model.sampler import MDSD3Sampler, SampleRequest
from mdsd3_cli.model.weights import build_model, fresh_adapter_config
from mdsd3_cli.recipe.train import TrainRecipeError, load_train_recipe
from mdsd3_cli.train.run import run_train
from mdsd3_cli.train.step import FlowSchedule, flow_matching_loss, step_generator

from .helpers import CLASSES, generate_recipe, mdsd3, write_recipe, yaml_text

RES = 32
START = FlowStart(alpha=0.3, beta=1.0)
"""The start of the learning test: mostly the clean latent, a little noise."""
STEPS = 40  # seen: identity error 0.16 (this start) vs 1.23 (pure noise), 0.23 (out of distribution), 0.38 (untrained)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's matrices are too small to share: a second thread only waits (5x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- the loss


@pytest.fixture()
def loss_inputs(tiny_base, tiny_prompts):
    """A fresh tiny MDSD3 model (its Z layers made non-zero, so the clean latent matters) and one batch."""
    model, config = build_model(tiny_base, config=fresh_adapter_config(tiny_base, CLASSES))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".z_" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    latents = torch.randn(4, 16, RES // 8, RES // 8, generator=torch.Generator().manual_seed(7))
    clean, degraded = latents[:2], latents[2:]
    prompts = ["rain", "clean"]
    embeds = torch.stack([tiny_prompts[p].embeds for p in prompts])
    pooled = torch.stack([tiny_prompts[p].pooled for p in prompts])
    mask = head_mask([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], config.head_partition)
    return model, clean, degraded, embeds, pooled, mask, FlowSchedule.from_base(tiny_base)


def hand_loss(model, clean, degraded, embeds, pooled, mask, schedule, source_of) -> torch.Tensor:
    """The flow-matching loss written out: σ and ε drawn as the trainer draws them (generator of data step 3),
    x_σ = (1 − σ)·x0 + σ·z_T, target z_T − x0 with z_T = source_of(ε)."""
    generator = step_generator(0, 3, 0)
    sigmas, timesteps = schedule.draw(len(degraded), generator, 0.0, 1.0)
    noise = torch.randn(degraded.shape, generator=generator, dtype=torch.float32)
    source = source_of(noise)
    sigma = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - sigma) * degraded + sigma * source
    prediction = model(
        hidden_states=noisy,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        timestep=timesteps,
        head_mask=mask,
        clean_latents=clean,
        return_dict=False,
    )[0]
    return ((prediction - (source - degraded)) ** 2).reshape(len(degraded), -1).mean(dim=1).mean()


def test_the_default_start_gives_the_pure_noise_loss_bit_for_bit(loss_inputs) -> None:
    model, clean, degraded, embeds, pooled, mask, schedule = loss_inputs
    with torch.no_grad():
        expected = hand_loss(model, clean, degraded, embeds, pooled, mask, schedule, lambda noise: noise)
        for start in (None, FlowStart(), FlowStart(alpha=1, beta=0)):
            loss = flow_matching_loss(
                model, clean, degraded, embeds, pooled, mask, step_generator(0, 3, 0), schedule, start=start
            )
            assert torch.equal(loss, expected), start


def test_another_start_is_the_flow_from_alpha_noise_plus_beta_clean(loss_inputs) -> None:
    model, clean, degraded, embeds, pooled, mask, schedule = loss_inputs
    start = FlowStart(alpha=0.6, beta=0.8)
    with torch.no_grad():
        expected = hand_loss(
            model, clean, degraded, embeds, pooled, mask, schedule, lambda noise: 0.6 * noise + 0.8 * clean
        )
        loss = flow_matching_loss(
            model, clean, degraded, embeds, pooled, mask, step_generator(0, 3, 0), schedule, start=start
        )
        pure_noise = flow_matching_loss(model, clean, degraded, embeds, pooled, mask, step_generator(0, 3, 0), schedule)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert not torch.isclose(loss, pure_noise, rtol=1e-3)


# ---------------------------------------------------------------------------------------------- the recipe


@pytest.fixture(scope="module")
def identity_photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("identity_photos")
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).resize((RES, RES), Image.BILINEAR).save(folder / f"{name}.png")
    return folder


IDENTITY_RECIPE = {
    "model": {"base": "tiny", "prompt_cache": "prompts"},
    "classes": ["haze"],
    "datasets": [
        {
            "name": "identity",
            "kind": "paired_folders",
            "clean": "photos",
            "degraded": "photos",
            "classes": {"haze": 0.0},
        }
    ],
    "data": {
        "resolution": RES,
        "random_crop": False,
        "random_flip": False,
        "cache_latents": True,
        "identity_fraction": 0.0,
        "condition_drop": 0.0,
        "workers": 0,
    },
    "train": {
        "steps": STEPS,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "lora_rank": 0,
    },
    "output": {
        "dir": "out",
        "preview_every": 0,
        "checkpoint_every": STEPS,
        "keep_checkpoints": 1,
        "log_every": STEPS,
    },
}
"""Identity pairs only (degraded = clean), fixed crops with cached latents, no LoRA, no previews."""


def identity_recipe(folder: Path, photos: Path, out: Path, start: FlowStart | None, cache: Path) -> Path:
    """IDENTITY_RECIPE on `photos` into `out`, sampling from `start` (the default start if None)."""
    overrides = [
        f"model.prompt_cache={yaml_text(cache)}",
        f"datasets.identity.clean={yaml_text(photos)}",
        f"datasets.identity.degraded={yaml_text(photos)}",
        f"output.dir={yaml_text(out)}",
    ]
    if start is not None:
        overrides.append(f"train.start={yaml_text(start.model_dump())}")
    return write_recipe(folder / f"{out.name}.yaml", *overrides, base=IDENTITY_RECIPE)


def test_train_start_is_validated_with_field_names(identity_photos, tmp_path) -> None:
    path = identity_recipe(tmp_path, identity_photos, tmp_path / "run", START, tmp_path / "prompts")
    assert load_train_recipe(path).train.start == START
    assert load_train_recipe(path, ["train.start.beta=0.5"]).train.start == FlowStart(alpha=0.3, beta=0.5)
    with pytest.raises(TrainRecipeError, match=r"run\.yaml: train\.start\.alpha .*: .*greater than 0"):
        load_train_recipe(path, ["train.start.alpha=0"])
    path.write_text(path.read_text().replace("beta: 1.0", "betta: 1.0"))
    with pytest.raises(TrainRecipeError, match=r"run\.yaml: train\.start\.betta: unknown field; did you mean 'beta'\?"):
        load_train_recipe(path)


def test_an_adapter_config_without_a_start_means_pure_noise(tmp_path, tiny_base) -> None:
    config = fresh_adapter_config(tiny_base, CLASSES).model_dump(mode="json")
    del config["start"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    assert read_adapter_config(tmp_path).start == FlowStart(alpha=1.0, beta=0.0)


# ---------------------------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def trained(identity_photos, tmp_path_factory) -> dict[str, Path]:
    """Two adapters trained STEPS steps on identity pairs: one for START, one for pure noise (the default)."""
    root = tmp_path_factory.mktemp("train_start")
    adapters = {}
    for label, start in (("start", START), ("noise", None)):
        summary = run_train(
            load_train_recipe(identity_recipe(root, identity_photos, root / label, start, root / "prompts"))
        )
        assert summary.exit_code == 0 and summary.last_loss < summary.first_loss
        adapters[label] = summary.adapter_dir
    return adapters


def identity_error(base, adapter: Path | None, start: FlowStart, photos: Path, cache: Path) -> float:
    """Mean squared latent error of the identity (no class) sampled in 2 steps from `start`, against the clean
    latents (the tiny VAE is random, so pixels mean nothing; latents do)."""
    if adapter is None:
        model, config = build_model(base, config=fresh_adapter_config(base, ["haze"]))
    else:
        model, config = build_model(base, adapter)
    prompts = load_prompt_embeddings("tiny", base.fingerprint, all_prompts(config.classes), cache)
    sampler = MDSD3Sampler(base, model, config, prompts)
    pixels = torch.stack(
        [torch.from_numpy(np.array(Image.open(path).convert("RGB"))) for path in sorted(photos.glob("*.png"))]
    )
    requests = [SampleRequest({}, seed=50 + index, alpha=start.alpha, beta=start.beta) for index in range(len(pixels))]
    latents = sampler.generate(pixels, requests, steps=2, guidance=1.0, output="latent")
    return float(((latents - sampler.encode(pixels)) ** 2).mean())


def test_the_exported_adapter_records_the_start_it_was_trained_for(trained) -> None:
    assert read_adapter_config(trained["start"]).start == START
    assert read_adapter_config(trained["noise"]).start == FlowStart()


def test_training_for_a_start_near_the_clean_image_lowers_the_2_step_identity_error(
    trained, identity_photos, fresh_base, tmp_path
) -> None:
    cache = tmp_path / "prompts"
    errors = {
        "trained for the start": identity_error(fresh_base, trained["start"], START, identity_photos, cache),
        "trained for pure noise": identity_error(fresh_base, trained["noise"], FlowStart(), identity_photos, cache),
        "trained for pure noise, sampled from the start": identity_error(
            fresh_base, trained["noise"], START, identity_photos, cache
        ),
        "untrained, sampled from the start": identity_error(fresh_base, None, START, identity_photos, cache),
    }
    print(errors)
    mine = errors.pop("trained for the start")
    for label, error in errors.items():
        assert mine < 0.85 * error, (label, mine, error)


# ---------------------------------------------------------------------------------------------- warnings


def adapter_recipe(folder: Path, adapter: Path, photos: Path, alpha: float, beta: float) -> Path:
    """A generate recipe sampling with `adapter` from (alpha, beta); the variant "own" from the adapter's start."""
    return generate_recipe(
        folder / "recipe.yaml",
        photos,
        folder / "out",
        f"model={yaml_text({'base': 'tiny', 'adapter': str(adapter), 'prompt_cache': str(folder / 'prompts')})}",
        f"input.size={RES}",
        f"sampling={{steps: 2, guidance: 1.0, alpha: {alpha}, beta: {beta}}}",
        "variants=[{name: identity, classes: {}}, {name: haze, classes: {haze: 1.0}}, {name: own, classes: {haze: 0.5}}]",
        f"variants.own.alpha={START.alpha}",
        f"variants.own.beta={START.beta}",
    )


def test_check_and_generate_warn_when_a_recipe_samples_from_another_start(trained, identity_photos, tmp_path) -> None:
    recipe = adapter_recipe(tmp_path, trained["start"], identity_photos, alpha=1.0, beta=0.0)
    for command in (["check", "--config", str(recipe)], ["generate", "--config", str(recipe), "--dry-run"]):
        result = mdsd3(*command)
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        assert (
            f"warning: model.adapter {trained['start']} was trained for the start alpha 0.3, beta 1 "
            "(z_T = alpha·noise + beta·clean latent), but variants identity, haze sample from alpha 1, beta 0." in text
        ), text
        assert "Set sampling.alpha: 0.3 and sampling.beta: 1" in text and "train.start" in text
        assert "variants own" not in text
    matching = adapter_recipe(tmp_path, trained["start"], identity_photos, alpha=START.alpha, beta=START.beta)
    result = mdsd3("check", "--config", str(matching))
    assert result.exit_code == 0 and "warning" not in result.output, result.output
