"""Base-model loading (local diffusers SD3 folders, shipped presets such as `mini`, or the seeded `tiny`
preset), fingerprints, and adapter weights (safetensors + JSON config). Nothing here downloads anything."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.torch import load_file, save

from mdsd3_cli.model.adapter import WEIGHTS_NAME, AdapterConfig, AdapterError, read_adapter_config, write_adapter_config
from mdsd3_cli.model.codec import PixelUnshuffleCodec, is_codec_folder
from mdsd3_cli.model.presets import resolve_base_source
from mdsd3_cli.model.sd3_folder import BaseModelError, check_base_folder  # noqa: F401  (BaseModelError: what load_base raises)
from mdsd3_cli.model.transformer import MDSD3Transformer
from mdsd3_cli.util.atomic import atomic_write

TINY = "tiny"
TINY_SEED = 0
TINY_TRANSFORMER = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=6,
    joint_attention_dim=32,
    caption_projection_dim=48,
    pooled_projection_dim=32,
    out_channels=16,
    pos_embed_max_size=96,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    layers_per_block=1,
    norm_num_groups=8,
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    shift_factor=0.0609,
    scaling_factor=1.5305,
    use_quant_conv=False,
    use_post_quant_conv=False,
    sample_size=64,
)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
"""The real SD3-medium transformer config (stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json):
the benchmarks build it with random weights."""
BASE_SHAPE_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "patch_size")
LORA_TARGETS = ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_TEXT_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class BaseModel:
    """A loaded SD3 base: transformer, VAE (or pixel codec) and scheduler configuration (text encoders load on
    demand)."""

    source: str
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL | PixelUnshuffleCodec
    scheduler_config: dict[str, Any]
    fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> dict[str, int]:
        """The transformer dimensions an adapter must match."""
        return {key: int(self.transformer.config[key]) for key in BASE_SHAPE_KEYS}

    def make_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        """A fresh scheduler (schedulers keep per-run state)."""
        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)


def _tensor_digest(modules: list[torch.nn.Module], prefix: str) -> str:
    digest = hashlib.sha256(prefix.encode())
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def build_tiny(
    seed: int = TINY_SEED, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> BaseModel:
    """The `tiny` preset: a seeded random small SD3 (2 blocks, 6 heads) and VAE. Its images mean nothing."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**TINY_TRANSFORMER)
        vae = AutoencoderKL(**TINY_VAE)
    fingerprint = "tiny-" + _tensor_digest([transformer, vae], f"tiny:v1:{seed}")
    for module in (transformer, vae):
        module.to(device) if dtype == torch.float32 else module.to(device=device, dtype=dtype)
        module.eval()
    return BaseModel(TINY, transformer, vae, dict(SD3_SCHEDULER), fingerprint, {"seed": seed})


def _file_digest(digest: hashlib._Hash, path: Path) -> None:
    """Add a weights file's identity: size, safetensors header and three 1 MiB samples."""
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with path.open("rb") as handle:
        head = handle.read(8)
        digest.update(head)
        if path.suffix == ".safetensors" and len(head) == 8:
            digest.update(handle.read(int.from_bytes(head, "little")))
        for offset in (0, size // 2, max(size - (1 << 20), 0)):
            handle.seek(offset)
            digest.update(handle.read(1 << 20))


def fingerprint_folder(root: Path) -> str:
    """A cheap, content-based fingerprint of a diffusers SD3 folder (configs + weight file samples)."""
    digest = hashlib.sha256(b"sd3-folder:v1")
    for sub in ("transformer", "vae", *_TEXT_FOLDERS):
        folder = root / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.endswith(".json"):
                digest.update(path.name.encode() + path.read_bytes())
            elif path.suffix in (".safetensors", ".bin"):
                _file_digest(digest, path)
    return digest.hexdigest()[:24]


def load_base(source: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> BaseModel:
    """Load `tiny`, a shipped preset (`mini`) or a local diffusers-format SD3 folder (transformer/, vae/,
    scheduler/); a vae/ whose config names `PixelUnshuffleCodec` loads that codec."""
    if source == TINY:
        return build_tiny(dtype=dtype, device=device)
    root = check_base_folder(resolve_base_source(source))
    transformer = SD3Transformer2DModel.from_pretrained(
        root, subfolder="transformer", torch_dtype=dtype, local_files_only=True
    )
    if is_codec_folder(root / "vae"):
        vae = PixelUnshuffleCodec.load(root / "vae").to(dtype=dtype)
    else:
        vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, local_files_only=True)
    scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(root / "scheduler"))
    transformer.to(device).eval()
    vae.to(device).eval()
    return BaseModel(str(root), transformer, vae, scheduler_config, fingerprint_folder(root))


def fingerprint_adapter(adapter_dir: str | os.PathLike) -> str:
    """A cheap, content-based fingerprint of an adapter folder (config + weight file samples)."""
    folder = Path(adapter_dir)
    digest = hashlib.sha256(b"mdsd3-adapter:v1")
    digest.update((folder / "adapter_config.json").read_bytes())
    _file_digest(digest, folder / WEIGHTS_NAME)
    return digest.hexdigest()[:24]


def fingerprint_base(source: str) -> str:
    """The fingerprint `load_base(source)` would report, without loading the folder's weights."""
    if source == TINY:
        return build_tiny().fingerprint
    return fingerprint_folder(check_base_folder(resolve_base_source(source)))


# --- adapters -----------------------------------------------------------------------------------------------


def add_lora(model: MDSD3Transformer, rank: int, seed: int = 0) -> None:
    """LoRA (peft) on the context stream's attention projections, where the head mask acts.

    LoRA's A matrices are drawn from a private RNG seeded with `seed`, so a fresh adapter is the same in
    every process (B starts at zero, so it does not change the model's output)."""
    from peft import LoraConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True))


def adapter_state_dict(model: MDSD3Transformer) -> dict[str, torch.Tensor]:
    """Trainable adapter tensors: clean branch + Z layers + LoRA; never base weights or fixed buffers."""
    state = {}
    for prefix, module in model.adapter_modules().items():
        for name, param in module.named_parameters():
            state[f"{prefix}.{name}"] = param
    for name, param in model.named_parameters():
        if "lora_" in name:
            state[name] = param
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}


def save_adapter(
    model: MDSD3Transformer, config: AdapterConfig, adapter_dir: str | os.PathLike, root: Path | None = None
) -> Path:
    """Write `adapter.safetensors` and `adapter_config.json` atomically (inside `root`, when given)."""
    folder = Path(adapter_dir)
    metadata = {"format": "mdsd3-adapter", "config": config.model_dump_json()}
    atomic_write(folder / WEIGHTS_NAME, save(adapter_state_dict(model), metadata=metadata), root=root)
    write_adapter_config(folder, config)
    return folder


def check_adapter_matches(config: AdapterConfig, base: BaseModel, adapter_dir: str | os.PathLike) -> None:
    """Refuse an adapter made for another base, naming both."""
    if config.base_shape != base.shape:
        raise AdapterError(
            f"adapter {adapter_dir} was made for a base of shape {config.base_shape}, "
            f"but {base.source} has shape {base.shape}"
        )
    if config.base_fingerprint != base.fingerprint:
        raise AdapterError(
            f"adapter {adapter_dir} was made for base fingerprint {config.base_fingerprint}, "
            f"but {base.source} has fingerprint {base.fingerprint}"
        )


def fresh_adapter_config(base: BaseModel, classes: list[str], lora_rank: int = 0, **extra: Any) -> AdapterConfig:
    """Config of a new (untrained) adapter on `base`."""
    return AdapterConfig.fresh(
        classes,
        base.fingerprint,
        base.shape,
        lora_rank=lora_rank,
        lora_targets=LORA_TARGETS if lora_rank else [],
        **extra,
    )


def build_model(
    base: BaseModel, adapter_dir: str | os.PathLike | None = None, config: AdapterConfig | None = None
) -> tuple[MDSD3Transformer, AdapterConfig]:
    """MDSD3 transformer on `base`: with `adapter_dir` its saved weights, else a fresh adapter from `config`
    (with the output convolution when the config asks for it)."""
    model = MDSD3Transformer.from_base(base.transformer)
    if adapter_dir is None:
        if config is None:
            raise ValueError("a fresh adapter needs an AdapterConfig (its classes)")
        if config.lora_rank:
            add_lora(model, config.lora_rank)
        if config.output_conv:
            model.enable_output_conv()
        return model, config
    config = read_adapter_config(adapter_dir)
    check_adapter_matches(config, base, adapter_dir)
    weights = Path(adapter_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"adapter weights not found: {weights}")
    if config.lora_rank:
        add_lora(model, config.lora_rank)
    if config.output_conv:
        model.enable_output_conv()
    tensors = load_file(str(weights))
    expected = set(adapter_state_dict(model))
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterError(f"adapter weights {weights} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    parameter = next(model.parameters())
    result = model.load_state_dict({k: v.to(parameter.dtype) for k, v in tensors.items()}, strict=False)
    if result.unexpected_keys:
        raise AdapterError(f"adapter weights {weights} have unexpected tensors {result.unexpected_keys[:5]}")
    return model, config


PARAMETER_GROUPS = {
    "base": "base (frozen)",
    "clean_branch": "clean branch (excl. Z)",
    "z_layers": "Z layers",
    "lora": "LoRA",
    "output_conv": "output convolution",
}
"""Disjoint parameter groups of an MDSD3 transformer, with their display names; they add up to the total."""


def parameter_group(name: str) -> str:
    """The group (a PARAMETER_GROUPS key) a named parameter of an MDSD3 transformer belongs to."""
    if "lora_" in name:
        return "lora"
    if name.startswith("output_conv."):
        return "output_conv"
    if name.startswith("clean_blocks.") and ".z_" in f".{name}":
        return "z_layers"
    if name.startswith(("clean_pos_embed.", "clean_blocks.")):
        return "clean_branch"
    return "base"


def describe_parameters(model: MDSD3Transformer, trainable_only: bool = False) -> dict[str, int]:
    """Parameter counts per disjoint group (base, clean branch without Z, Z layers, LoRA, and the output
    convolution for models that have one); they add up to the model's total, or with `trainable_only` to the
    number of trainable parameters."""
    counts = {name: 0 for name in PARAMETER_GROUPS if name != "output_conv" or model.output_conv is not None}
    for name, param in model.named_parameters():
        if param.requires_grad or not trainable_only:
            counts[parameter_group(name)] += param.numel()
    return counts
