"""Physically motivated synthetic degradations, batched in torch on any device (training pairs on the fly).

Every function takes clean images `[B, 3, H, W]` float in [0, 1], a per-sample ratio `r` in [0, 1] (a tensor
`[B]` or a float) and a `torch.Generator` on the images' device, and returns degraded images in [0, 1]. The
ratio scales the physical strength parameter(s) linearly from 0; `r = 0` returns the clean image exactly.
Random parameters that do not depend on `r` (haze depth map, rain drops, noise fields) are drawn the same way
whatever `r` is, so for one generator seed the strength grows monotonically with `r`. The per-pixel randomness
of rain, noise and low light can instead come from a given standard-normal `field` [B, 3, H, W] (`field=`):
mini's training passes the flow's own start noise there, so the degradation is a function of the noise the
sampler starts from (scripts/train_mini.py, docs/mini.md). Parameters are given at
ratio 1; lengths in pixels are relative to the image height so the look does not depend on resolution.

* haze (atmospheric scattering):  I = J·t + A·(1 − t),  t = exp(−β·d)
    β = 2.2·r (extinction); d in [0.2, 1] a depth proxy: farther towards the top of the frame, plus a smooth
    random field (scene layout); A = airlight, a light grey with a slight random tint (0.78-0.95).
* rain (a streak layer rasterised onto the image, then a veil):  V = J + v·(c − J),  I = V + S·(1 − V)
    S = streaks: one per drop, drop density ρ = 0.003·r per pixel at 128 px (∝ 1/H²: the same drops per image
    area at any size; the drop positions of one seed or field
    are nested: a larger r only adds drops); every streak falls straight down (vertical: a direction the sampler
    can know, not a per-image draw it would have to average over, docs/mini.md); per streak a length
    of 6-20 % of the height and a width (Gaussian cross-section, std 0.3-0.75 px at 128 px, in proportion to
    the height, in two classes) that grow together (near drops are longer and wider), a brightness 0.3-0.75,
    soft ends (motion blur along the fall). The screen blend makes every streak brighter than what is behind
    it. Veil v = 0.06·r towards a light grey c = 0.9. Each streak is splatted as points one pixel apart along
    its segment (bilinear), then each width class is blurred across in one FFT pass: cost about linear in the
    pixel count (the old direct convolution with a kernel 0.12·H wide was O(H⁴)).
* noise (signal-dependent Poisson–Gaussian, heteroscedastic normal approximation):
    I = J + sqrt(a·J + b²)·n,  n ~ N(0, 1) per pixel and channel;  a = 0.03·r (shot), b = 0.05·r (read)
* low_light (under-exposure, camera gamma, and the sensor noise of the dark image):
    D = 2^(−EV)·J^γ,  EV = 1.8·r stops,  γ = 1 + 0.4·r;  I = D + sqrt(a·D + b²)·n,  a = 0.004·r, b = 0.008·r

`degrade` applies one class per sample (training pairs are single-class: composition is left to the model).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = ("rain", "haze", "noise", "low_light")

HAZE_BETA = 2.2
HAZE_DEPTH_MIN = 0.2
RAIN_DENSITY = 0.003
RAIN_LENGTH = (0.06, 0.2)
RAIN_ANGLE_DEG = 0.0
"""The streaks' direction, degrees from vertical (the same for every image)."""
RAIN_WIDTH = (0.3, 0.75)
RAIN_WIDTH_CLASSES = 2
RAIN_BRIGHTNESS = (0.3, 0.75)
RAIN_VEIL, RAIN_VEIL_COLOUR = 0.06, 0.9
RAIN_REFERENCE_HEIGHT = 128
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


def _uniform(
    shape: Sequence[int], low: float, high: float, generator: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    return low + (high - low) * torch.rand(tuple(shape), generator=generator, device=like.device, dtype=like.dtype)


def _field(images: torch.Tensor, generator: torch.Generator, field: torch.Tensor | None) -> torch.Tensor:
    """The standard-normal field [B, 3, H, W] of one call: the given one, or drawn from `generator`."""
    if field is None:
        return torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    if field.shape != images.shape:
        raise ValueError(f"field of shape {tuple(field.shape)} for images of shape {tuple(images.shape)}")
    return field.to(images.device, images.dtype)


def _poisson_gaussian(
    signal: torch.Tensor, shot: torch.Tensor, read: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """signal + sqrt(shot·signal + read²)·n, clipped to [0, 1]; zero shot and read give the signal exactly."""
    return (signal + torch.sqrt(shot * signal.clamp(min=0) + read * read) * noise).clamp(0, 1)


def depth_proxy(batch: int, height: int, width: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] pseudo-depth in [HAZE_DEPTH_MIN, 1]: 60 % vertical position (top is far), 40 % a smooth field."""
    rows = torch.linspace(1.0, 0.0, height, device=like.device, dtype=like.dtype).view(1, 1, height, 1)
    field = torch.rand((batch, 1, 4, 4), generator=generator, device=like.device, dtype=like.dtype)
    field = F.interpolate(field, size=(height, width), mode="bicubic", align_corners=True).clamp(0, 1)
    return HAZE_DEPTH_MIN + (1 - HAZE_DEPTH_MIN) * (0.6 * rows + 0.4 * field)


def haze(
    images: torch.Tensor, ratio: torch.Tensor | float, generator: torch.Generator, field: torch.Tensor | None = None
) -> torch.Tensor:
    """Atmospheric scattering I = J·t + A·(1 − t), t = exp(−2.2·r·d) (see the module docstring); smooth, so
    `field` is not used."""
    r = _ratios(ratio, images)
    batch, _, height, width = images.shape
    depth = depth_proxy(batch, height, width, generator, images)
    airlight = _uniform((batch, 1, 1, 1), 0.82, 0.92, generator, images) + _uniform(
        (batch, 3, 1, 1), -0.04, 0.03, generator, images
    )
    transmission = torch.exp(-HAZE_BETA * r * depth)
    return (images * transmission + airlight * (1 - transmission)).clamp(0, 1)


@functools.lru_cache(maxsize=8)
def _blur_transfer(rows: int, cols: int, sigmas: tuple[float, ...]) -> torch.Tensor:
    """[C, rows, cols // 2 + 1] rfft2 transfer of one Gaussian per width class, each scaled so that a blurred
    line keeps about its peak (the streak's brightness)."""
    fy2 = torch.fft.fftfreq(rows, dtype=torch.float64)[:, None] ** 2
    fx2 = torch.fft.rfftfreq(cols, dtype=torch.float64)[None, :] ** 2
    return torch.stack(
        [
            math.sqrt(2 * math.pi * (sigma**2 + 0.1)) * torch.exp(-2 * math.pi**2 * sigma**2 * (fy2 + fx2))
            for sigma in sigmas
        ]
    ).float()


def streak_layer(
    shape: tuple[int, int, int], drops: torch.Tensor, near: torch.Tensor, brightness: torch.Tensor, angles: torch.Tensor
) -> torch.Tensor:
    """[B, 1, H, W] streak layer in [0, 1] for images of `shape` (B, H, W): one streak centred on each drop.
    `drops` [D, 3] holds (image, row, column), `near` [D] in [0, 1] each streak's size (length and width grow
    with it), `brightness` [D] its peak value; `angles` [B] each image's direction (rad from vertical).
    Points one pixel apart along every segment are splatted bilinearly into one padded canvas per width class;
    the classes are blurred across by their Gaussians in one FFT pass: cost linear in pixels and streaks."""
    batch, height, width = shape
    like = brightness
    scale = height / RAIN_REFERENCE_HEIGHT
    sigmas = [
        (RAIN_WIDTH[0] + (RAIN_WIDTH[1] - RAIN_WIDTH[0]) * (index + 0.5) / RAIN_WIDTH_CLASSES) * scale
        for index in range(RAIN_WIDTH_CLASSES)
    ]
    pad = math.ceil(3 * max(sigmas)) + 2
    rows, cols = height + 2 * pad, width + 2 * pad
    lengths = (RAIN_LENGTH[0] + (RAIN_LENGTH[1] - RAIN_LENGTH[0]) * near) * height
    points = math.ceil(float(lengths.max())) + 2 if len(lengths) else 2
    along = torch.linspace(-0.5, 0.5, points, device=like.device, dtype=like.dtype)
    taper = ((1.0 - 2 * along.abs()) * 4).clamp(max=1.0)  # soft ends: the outer eighths fade out
    image = drops[:, 0]
    offsets = along[None, :] * lengths[:, None]  # [D, P] px along the streak, centred on the drop
    x = drops[:, 2, None].to(like.dtype) + pad + offsets * torch.sin(angles[image])[:, None]
    y = drops[:, 1, None].to(like.dtype) + pad + offsets * torch.cos(angles[image])[:, None]
    inside = ((x >= 0) & (x <= cols - 2) & (y >= 0) & (y <= rows - 2)).to(like.dtype)
    weight = (brightness * lengths / (points - 1))[:, None] * taper * inside  # line density = brightness
    x, y = x.clamp(0, cols - 2), y.clamp(0, rows - 2)
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    bins = (near * RAIN_WIDTH_CLASSES).long().clamp(max=RAIN_WIDTH_CLASSES - 1)
    corner = ((bins * batch + image)[:, None] * rows + y0.long()) * cols + x0.long()
    index = torch.cat([corner, corner + 1, corner + cols, corner + cols + 1], dim=1).flatten()
    shares = torch.cat([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dim=1)
    canvas = torch.zeros(RAIN_WIDTH_CLASSES * batch * rows * cols, device=like.device, dtype=like.dtype)
    canvas.index_add_(0, index, (shares * weight.repeat(1, 4)).flatten())
    spectrum = torch.fft.rfft2(canvas.view(RAIN_WIDTH_CLASSES, batch, rows, cols))
    transfer = _blur_transfer(rows, cols, tuple(sigmas)).to(like.device, like.dtype)
    layer = torch.fft.irfft2((spectrum * transfer[:, None]).sum(0), s=(rows, cols))
    return layer[:, None, pad : pad + height, pad : pad + width].clamp(0, 1)


def rain(
    images: torch.Tensor, ratio: torch.Tensor | float, generator: torch.Generator, field: torch.Tensor | None = None
) -> torch.Tensor:
    """Rain streaks screen-blended onto a slight veil (see the module docstring). Where the drops fall, their
    size and brightness come from `field` (drawn from `generator` when None): a drop wherever Φ(field[:, 0])
    < ρ·r, size Φ(field[:, 1]), brightness from Φ(field[:, 2]); the direction is fixed (RAIN_ANGLE_DEG)."""
    r = _ratios(ratio, images)
    batch, _, height, width = images.shape
    angles = torch.full((batch,), math.radians(RAIN_ANGLE_DEG), device=images.device, dtype=images.dtype)
    density = RAIN_DENSITY * (RAIN_REFERENCE_HEIGHT / height) ** 2  # drops per image area: same look at any size
    if field is None:  # uniforms drawn directly: positions per pixel, sizes and brightness per drop
        uniform = torch.rand((batch, height, width), generator=generator, device=images.device, dtype=images.dtype)
        drops = torch.nonzero(uniform < density * r.view(-1, 1, 1))
        picked = torch.rand((len(drops), 2), generator=generator, device=images.device, dtype=images.dtype)
    else:
        values = _field(images, generator, field)
        threshold = torch.special.ndtri(density * r.view(-1, 1, 1))  # -inf at r = 0: no drops
        drops = torch.nonzero(values[:, 0] < threshold)
        picked = torch.special.ndtr(values[drops[:, 0], 1:, drops[:, 1], drops[:, 2]])  # [D, 2] uniforms
    near = picked[:, 0]
    brightness = RAIN_BRIGHTNESS[0] + (RAIN_BRIGHTNESS[1] - RAIN_BRIGHTNESS[0]) * picked[:, 1]
    layer = streak_layer((batch, height, width), drops, near, brightness, angles)
    veil = RAIN_VEIL * r
    # screen blend of the layer over the veiled image: 1 − (1 − S)·(1 − V), V = J + v·(c − J)
    dark = (1 - images).mul_(1 - veil).add_(veil * (1 - RAIN_VEIL_COLOUR)).mul_(1 - layer)
    rained = dark.neg_().add_(1)  # in [0, 1] for images and layer in [0, 1]
    return torch.where(r == 0, images, rained) if bool((r == 0).any()) else rained  # r = 0: the clean image exactly


def noise(
    images: torch.Tensor, ratio: torch.Tensor | float, generator: torch.Generator, field: torch.Tensor | None = None
) -> torch.Tensor:
    """Signal-dependent Poisson–Gaussian noise, shot a = 0.03·r, read b = 0.05·r; n is `field` when given."""
    r = _ratios(ratio, images)
    return _poisson_gaussian(images, NOISE_SHOT * r, NOISE_READ * r, _field(images, generator, field))


def low_light(
    images: torch.Tensor, ratio: torch.Tensor | float, generator: torch.Generator, field: torch.Tensor | None = None
) -> torch.Tensor:
    """Under-exposure by 1.8·r stops and gamma 1 + 0.4·r, then the dark image's sensor noise (n: `field`)."""
    r = _ratios(ratio, images)
    dark = torch.exp2(-LOW_LIGHT_EV * r) * images.clamp(min=0) ** (1 + LOW_LIGHT_GAMMA * r)
    return _poisson_gaussian(dark, LOW_LIGHT_SHOT * r, LOW_LIGHT_READ * r, _field(dark, generator, field))


DEGRADATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "rain": rain,
    "haze": haze,
    "noise": noise,
    "low_light": low_light,
}


def degrade(
    images: torch.Tensor,
    classes: Sequence[str],
    class_index: torch.Tensor,
    ratio: torch.Tensor,
    generator: torch.Generator,
    field: torch.Tensor | None = None,
) -> torch.Tensor:
    """One class per sample: sample b gets `classes[class_index[b]]` at `ratio[b]` (ratio 0: unchanged); the
    per-pixel randomness from `field[b]` when a field is given."""
    out = images.clone()
    ratio = ratio.to(images.device, images.dtype)
    for index, name in enumerate(classes):
        rows = torch.nonzero(class_index.to(images.device) == index).flatten()
        if len(rows):
            out[rows] = DEGRADATIONS[name](images[rows], ratio[rows], generator, None if field is None else field[rows])
    return out


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to the 256 levels of uint8 (what a pair saved as PNG holds)."""
    return torch.round(images.clamp(0, 1) * 255) / 255


def degrade_photo(pixels: np.ndarray, name: str, ratio: float, generator: torch.Generator) -> np.ndarray:
    """One uint8 RGB photo [H, W, 3] degraded by class `name` at `ratio`, as the uint8 image a PNG pair holds."""
    image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 255
    degraded = quantize(DEGRADATIONS[name](image, ratio, generator))[0]
    return (degraded.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
