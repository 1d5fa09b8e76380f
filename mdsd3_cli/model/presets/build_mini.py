"""The `mini` preset's architecture and how a trained mini model is written as a preset folder.

mini is the same MDSD3Transformer (an SD3 MMDiT: 6 joint blocks, 8 heads of 24, width 192) on a lossless
pixel-unshuffle codec (×4: 48 channels, one token per 8×8 pixels), with a bag-of-words text encoder whose four
class words and "clean" have fixed vectors shipped with it. About 10.9 M parameters, stored in fp16 (~22 MB).

Training trains everything at once (scripts/train_mini.py); the result is split into what the loaders read:
`base/` (a diffusers-format folder: transformer/ weights + config, vae/ the codec config, scheduler/,
text_encoder/ the word vectors) and `adapter/` (the clean branch, Z layers, mini v3's output convolution and
the adapter config pointing at the base's fingerprint, with the prediction the model was trained for). LoRA is
not used: the context-stream weights it would adapt are trained directly.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from mdsd3_cli.model.adapter import AdapterConfig, FlowStart
from mdsd3_cli.model.codec import PixelUnshuffleCodec
from mdsd3_cli.model.heads import CLEAN_PROMPT
from mdsd3_cli.model.presets.degradations import CLASSES
from mdsd3_cli.model.prompts import WordTextEncoder
from mdsd3_cli.model.transformer import MDSD3Transformer
from mdsd3_cli.model.weights import (
    BaseModel,
    fingerprint_adapter,
    fingerprint_folder,
    fresh_adapter_config,
    save_adapter,
)
from mdsd3_cli.util.atomic import atomic_write

MINI_CLASSES = list(CLASSES)
MINI_RESOLUTION = 128
MINI_CODEC = dict(factor=4, in_channels=3, shift_factor=0.0, scaling_factor=2.0)
MINI_TEXT_DIM = 64
MINI_TRANSFORMER = dict(
    sample_size=MINI_RESOLUTION // 4,
    patch_size=2,
    in_channels=48,
    num_layers=6,
    attention_head_dim=24,
    num_attention_heads=8,
    joint_attention_dim=MINI_TEXT_DIM,
    caption_projection_dim=192,
    pooled_projection_dim=MINI_TEXT_DIM,
    out_channels=48,
    pos_embed_max_size=48,
)
MINI_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)  # 256 tokens at 128 px: SD3's low-resolution shift
STORE_DTYPE = torch.float16


def mini_words(seed: int) -> WordTextEncoder:
    """Orthogonal vectors (unit variance entries) for "clean", the classes and the shared pooled vector, from a
    seeded generator. They are drawn once when a model is trained and then shipped, never redrawn at load time."""
    words = [CLEAN_PROMPT, *MINI_CLASSES]
    gaussian = torch.randn(MINI_TEXT_DIM, len(words) + 1, generator=torch.Generator("cpu").manual_seed(seed))
    vectors = torch.linalg.qr(gaussian).Q.T.contiguous() * MINI_TEXT_DIM**0.5
    return WordTextEncoder(words, vectors[:-1], vectors[-1], max_words=len(MINI_CLASSES))


def fresh_mini(seed: int, gated: bool = False) -> tuple[BaseModel, MDSD3Transformer, WordTextEncoder]:
    """A randomly initialised mini base + MDSD3 model (clean branch copied from the base, zero Z layers); `gated`:
    twice the output channels, for the residual x-prediction's gated skip (mini v3, docs/METHOD.md §7)."""
    shape = dict(MINI_TRANSFORMER, out_channels=2 * MINI_TRANSFORMER["out_channels"]) if gated else MINI_TRANSFORMER
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**shape)
    base = BaseModel(
        f"mini (fresh, seed {seed})",
        transformer,
        PixelUnshuffleCodec(**MINI_CODEC),
        dict(MINI_SCHEDULER),
        f"mini-fresh-{seed}",
    )
    return base, MDSD3Transformer.from_base(transformer), mini_words(seed)


def _base_state(model: MDSD3Transformer) -> dict[str, torch.Tensor]:
    adapter_prefixes = tuple(f"{name}." for name in model.adapter_modules())
    return {name: tensor for name, tensor in model.state_dict().items() if not name.startswith(adapter_prefixes)}


def save_preset(
    model: MDSD3Transformer,
    words: WordTextEncoder,
    folder: str | os.PathLike,
    training: dict | None = None,
    start: FlowStart | None = None,
    prediction: str = "velocity",
) -> dict[str, str]:
    """Write `folder/base` and `folder/adapter` (weights in fp16) from a jointly trained mini model, whose adapter
    config records the flow `start` and the `prediction` it was trained for and whether it has the output
    convolution (stored with the adapter's weights); returns the fingerprints {"base": ..., "adapter": ...}.
    An existing folder's base/ and adapter/ are replaced."""
    folder = Path(folder)
    base_dir, adapter_dir = folder / "base", folder / "adapter"
    for old in (base_dir, adapter_dir):
        shutil.rmtree(old, ignore_errors=True)
    config = {key: value for key, value in dict(model.config).items() if not key.startswith("_")}
    transformer = SD3Transformer2DModel(**config)
    transformer.load_state_dict(_base_state(model))
    transformer.to(STORE_DTYPE).save_pretrained(base_dir / "transformer", safe_serialization=True)
    PixelUnshuffleCodec(**MINI_CODEC).save_config(base_dir / "vae")
    FlowMatchEulerDiscreteScheduler(**MINI_SCHEDULER).save_config(base_dir / "scheduler")
    words.save(base_dir / "text_encoder")
    base_fingerprint = fingerprint_folder(base_dir)

    stored = MDSD3Transformer.from_base(transformer)  # fp16 base + the trained clean branch, cast to fp16
    if model.output_conv is not None:
        stored.enable_output_conv()
    stored.load_state_dict({k: v.to(STORE_DTYPE) for k, v in model.state_dict().items()})
    base = BaseModel(
        str(base_dir), transformer, PixelUnshuffleCodec(**MINI_CODEC), dict(MINI_SCHEDULER), base_fingerprint
    )
    adapter_config: AdapterConfig = fresh_adapter_config(
        base,
        MINI_CLASSES,
        training=dict(training or {}),
        start=start or FlowStart(),
        prediction=prediction,
        output_conv=model.output_conv is not None,
    )
    save_adapter(stored, adapter_config, adapter_dir)
    fingerprints = {"base": base_fingerprint, "adapter": fingerprint_adapter(adapter_dir)}
    atomic_write(folder / "fingerprints.json", (json.dumps(fingerprints, indent=2) + "\n").encode())
    return fingerprints


def preset_sizes(folder: str | os.PathLike) -> dict[str, int]:
    """Bytes of every file under a preset folder, by relative path."""
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
