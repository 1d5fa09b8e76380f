"""A lossless pixel-space codec with the VAE interface the sampler and trainer use (the `mini` preset's "VAE").

`PixelUnshuffleCodec` folds each `factor`×`factor` block of RGB pixels into channels: an image [B, 3, H, W] in
[-1, 1] becomes a latent [B, 3·factor², H/factor, W/factor] and back, exactly (no weights, nothing learned).
With factor 4 and the transformer's patch size 2, one token covers 8×8 pixels, as with SD3's VAE; the
transformer then predicts all 192 values of its pixels, which a hidden size ≥ 192 can do without a rank limit.

It speaks AutoencoderKL's interface: `encode(x).latent_dist.mode()`, `decode(z).sample`, `config.shift_factor`
and `config.scaling_factor` (latent = (x − shift)·scale, so pixel latents get roughly unit variance), `dtype`,
`.to()`. A base folder holds it as `vae/config.json` with `"_class_name": "PixelUnshuffleCodec"`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, IdentityDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import nn

CODEC_CLASS = "PixelUnshuffleCodec"


class PixelUnshuffleCodec(nn.Module, ConfigMixin):
    """Pixel-unshuffle "VAE": [B, 3, H, W] <-> [B, 3·f², H/f, W/f], lossless."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, factor: int = 4, in_channels: int = 3, shift_factor: float = 0.0, scaling_factor: float = 2.0):
        super().__init__()
        # Holds no weights; this empty buffer follows `.to(device, dtype)` so `dtype`/`device` behave like a VAE's.
        self.register_buffer("_probe", torch.zeros(0), persistent=False)

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels * self.config.factor**2

    @property
    def dtype(self) -> torch.dtype:
        return self._probe.dtype

    @property
    def device(self) -> torch.device:
        return self._probe.device

    def encode(self, images: torch.Tensor) -> AutoencoderKLOutput:
        """Images [B, 3, H, W] (H, W multiples of `factor`) -> latents; `.latent_dist.mode()` gives them."""
        return AutoencoderKLOutput(latent_dist=IdentityDistribution(F.pixel_unshuffle(images, self.config.factor)))

    def decode(self, latents: torch.Tensor) -> DecoderOutput:
        """Latents -> images; `.sample` gives them."""
        return DecoderOutput(sample=F.pixel_shuffle(latents, self.config.factor))

    @classmethod
    def load(cls, folder: str | Path) -> PixelUnshuffleCodec:
        """The codec described by `folder/config.json`."""
        return cls.from_config(json.loads((Path(folder) / cls.config_name).read_text()))


def is_codec_folder(folder: str | Path) -> bool:
    """Whether a base folder's `vae/` holds a PixelUnshuffleCodec config instead of an AutoencoderKL."""
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text()).get("_class_name") == CODEC_CLASS
    except (OSError, json.JSONDecodeError):
        return False
