"""Physically motivated synthetic degradations, batched in torch on any device (training pairs on the fly).

Every function takes clean images `[B, 3, H, W]` float in [0, 1], a per-sample ratio `r` in [0, 1] (a tensor
`[B]` or a float) and a `torch.Generator` on the images' device, and returns degraded images in [0, 1]. The
ratio scales the physical strength parameter(s) linearly from 0; `r = 0` returns the clean image exactly.
Random parameters that do not depend on `r` (rain angle, haze depth map, noise fields) are drawn the same way
whatever `r` is, so for one generator seed the strength grows monotonically with `r`. Parameters are given at
ratio 1; lengths in pixels are relative to the image height so the look does not depend on resolution.

* haze (atmospheric scattering):  I = J·t + A·(1 − t),  t = exp(−β·d)
    β = 2.2·r (extinction); d in [0.2, 1] a depth proxy: farther towards the top of the frame, plus a smooth
    random field (scene layout); A = airlight, a light grey with a slight random tint (0.78-0.95).
* rain (streak layer):  I = J·(1 − α·S) + α·S·c
    S = drops convolved with a line kernel: drop density ρ = 0.006·r per pixel (drops of one seed are nested:
    a larger r only adds drops), streak length 6-12 % of the height, angle ±25° from vertical (one per image),
    width σ 0.5-1.0 px across the streak (the blur), drop brightness 0.6-1; opacity α = 0.75, streak colour c = 0.95.
* noise (signal-dependent Poisson–Gaussian, heteroscedastic normal approximation):
    I = J + sqrt(a·J + b²)·n,  n ~ N(0, 1) per pixel and channel;  a = 0.03·r (shot), b = 0.05·r (read)
* low_light (under-exposure, camera gamma, and the sensor noise of the dark image):
    D = 2^(−EV)·J^γ,  EV = 1.8·r stops,  γ = 1 + 0.4·r;  I = D + sqrt(a·D + b²)·n,  a = 0.004·r, b = 0.008·r

`degrade` applies one class per sample (training pairs are single-class: composition is left to the model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = ("rain", "haze", "noise", "low_light")

HAZE_BETA = 2.2
HAZE_DEPTH_MIN = 0.2
RAIN_DENSITY = 0.006
RAIN_LENGTH = (0.06, 0.12)
RAIN_ANGLE_DEG = 25.0
RAIN_WIDTH = (0.5, 1.0)
RAIN_OPACITY = 0.75
RAIN_COLOUR = 0.95
NOISE_SHOT, NOISE_READ = 0.03, 0.05
LOW_LIGHT_EV, LOW_LIGHT_GAMMA = 1.8, 0.4
LOW_LIGHT_SHOT, LOW_LIGHT_READ = 0.004, 0.008


def _ratios(ratio: torch.Tensor | float, images: torch.Tensor) -> torch.Tensor:
    """Per-sample ratios as a [B, 1, 1, 1] float tensor on the images' device."""
    r = torch.as_tensor(ratio, dtype=images.dtype, device=images.device)
    r = r.expand(images.shape[0]) if r.dim() == 0 else r
    if ((r < 0) | (r > 1)).any():
        raise ValueError("degradation ratios must lie in [0, 1]")
    return r.view(-1, 1, 1, 1)


def _uniform(shape: Sequence[int], low: float, high: float, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return low + (high - low) * torch.rand(tuple(shape), generator=generator, device=like.device, dtype=like.dtype)


def _poisson_gaussian(signal: torch.Tensor, shot: torch.Tensor, read: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """signal + sqrt(shot·signal + read²)·n, clipped to [0, 1]; zero shot and read give the signal exactly."""
    noise = torch.randn(signal.shape, generator=generator, device=signal.device, dtype=signal.dtype)
    return (signal + torch.sqrt(shot * signal.clamp(min=0) + read * read) * noise).clamp(0, 1)


def depth_proxy(batch: int, height: int, width: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] pseudo-depth in [HAZE_DEPTH_MIN, 1]: 60 % vertical position (top is far), 40 % a smooth field."""
    rows = torch.linspace(1.0, 0.0, height, device=like.device, dtype=like.dtype).view(1, 1, height, 1)
    field = torch.rand((batch, 1, 4, 4), generator=generator, device=like.device, dtype=like.dtype)
    field = F.interpolate(field, size=(height, width), mode="bicubic", align_corners=True).clamp(0, 1)
    return HAZE_DEPTH_MIN + (1 - HAZE_DEPTH_MIN) * (0.6 * rows + 0.4 * field)


def haze(images: torch.Tensor, ratio: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """Atmospheric scattering I = J·t + A·(1 − t), t = exp(−2.2·r·d) (see the module docstring)."""
    r = _ratios(ratio, images)
    batch, _, height, width = images.shape
    depth = depth_proxy(batch, height, width, generator, images)
    airlight = _uniform((batch, 1, 1, 1), 0.82, 0.92, generator, images) + _uniform((batch, 3, 1, 1), -0.04, 0.03, generator, images)
    transmission = torch.exp(-HAZE_BETA * r * depth)
    return (images * transmission + airlight * (1 - transmission)).clamp(0, 1)


def streak_kernels(lengths: torch.Tensor, angles: torch.Tensor, widths: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 1, size, size] line kernels (peak 1): a segment of `lengths` px at `angles` rad from vertical,
    with a Gaussian cross-section of std `widths` px and soft ends."""
    offsets = torch.arange(size, device=lengths.device, dtype=lengths.dtype) - size // 2
    y, x = offsets.view(1, -1, 1), offsets.view(1, 1, -1)
    sin, cos = torch.sin(angles).view(-1, 1, 1), torch.cos(angles).view(-1, 1, 1)
    along = x * sin + y * cos
    across = x * cos - y * sin
    profile = torch.exp(-across**2 / (2 * widths.view(-1, 1, 1) ** 2))
    ends = torch.sigmoid(2.0 * (lengths.view(-1, 1, 1) / 2 - along.abs()))
    return (profile * ends)[:, None]


def rain(images: torch.Tensor, ratio: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """Rain streak layer blended onto the image (see the module docstring)."""
    r = _ratios(ratio, images)
    batch, _, height, width = images.shape
    like = images
    lengths = _uniform((batch,), *RAIN_LENGTH, generator, like) * height
    angles = _uniform((batch,), -1.0, 1.0, generator, like) * math.radians(RAIN_ANGLE_DEG)
    widths = _uniform((batch,), *RAIN_WIDTH, generator, like)
    seeds = torch.rand((batch, 1, height, width), generator=generator, device=like.device, dtype=like.dtype)
    brightness = _uniform((batch, 1, height, width), 0.6, 1.0, generator, like)
    drops = torch.where(seeds < RAIN_DENSITY * r, brightness, torch.zeros_like(brightness))
    size = 2 * math.ceil(RAIN_LENGTH[1] * height / 2 + 2) + 1
    kernels = streak_kernels(lengths, angles, widths, size)
    layer = F.conv2d(drops.view(1, batch, height, width), kernels, padding=size // 2, groups=batch)
    layer = RAIN_OPACITY * layer.view(batch, 1, height, width).clamp(0, 1)
    return (images * (1 - layer) + RAIN_COLOUR * layer).clamp(0, 1)


def noise(images: torch.Tensor, ratio: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """Signal-dependent Poisson–Gaussian noise, shot a = 0.03·r, read b = 0.05·r."""
    r = _ratios(ratio, images)
    return _poisson_gaussian(images, NOISE_SHOT * r, NOISE_READ * r, generator)


def low_light(images: torch.Tensor, ratio: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """Under-exposure by 1.8·r stops and gamma 1 + 0.4·r, then the dark image's sensor noise."""
    r = _ratios(ratio, images)
    dark = torch.exp2(-LOW_LIGHT_EV * r) * images.clamp(min=0) ** (1 + LOW_LIGHT_GAMMA * r)
    return _poisson_gaussian(dark, LOW_LIGHT_SHOT * r, LOW_LIGHT_READ * r, generator)


DEGRADATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor | float, torch.Generator], torch.Tensor]] = {
    "rain": rain, "haze": haze, "noise": noise, "low_light": low_light,
}


def degrade(images: torch.Tensor, classes: Sequence[str], class_index: torch.Tensor, ratio: torch.Tensor,
            generator: torch.Generator) -> torch.Tensor:
    """One class per sample: sample b gets `classes[class_index[b]]` at `ratio[b]` (ratio 0: unchanged)."""
    out = images.clone()
    ratio = ratio.to(images.device, images.dtype)
    for index, name in enumerate(classes):
        rows = torch.nonzero(class_index.to(images.device) == index).flatten()
        if len(rows):
            out[rows] = DEGRADATIONS[name](images[rows], ratio[rows], generator)
    return out


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to the 256 levels of uint8 (what a pair saved as PNG holds)."""
    return torch.round(images.clamp(0, 1) * 255) / 255


def degrade_photo(pixels: np.ndarray, name: str, ratio: float, generator: torch.Generator) -> np.ndarray:
    """One uint8 RGB photo [H, W, 3] degraded by class `name` at `ratio`, as the uint8 image a PNG pair holds."""
    image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 255
    degraded = quantize(DEGRADATIONS[name](image, ratio, generator))[0]
    return (degraded.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
