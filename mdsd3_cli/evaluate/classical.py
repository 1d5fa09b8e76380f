"""Classical degradations with known parameters: the ground truth the estimators are tested and benchmarked on.

Every function takes uint8 RGB pixels [H, W, 3] and returns uint8 RGB pixels of the same shape (values are
rounded and clipped to 0-255, as a saved image would be).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def gaussian_noise(pixels: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Additive white Gaussian noise, independent per pixel and channel, std `sigma` in 8-bit levels."""
    noise = np.random.default_rng(seed).normal(0.0, sigma, pixels.shape)
    return _to_uint8(pixels.astype(np.float64) + noise)


def haze(pixels: np.ndarray, transmission: float, airlight: float = 230.0) -> np.ndarray:
    """Koschmieder's model with uniform depth: I = t·J + (1 − t)·A (`airlight` A in 8-bit levels)."""
    return _to_uint8(transmission * pixels.astype(np.float64) + (1.0 - transmission) * airlight)


def low_light(pixels: np.ndarray, exposure: float) -> np.ndarray:
    """Under-exposure: every linear-ish value scaled by `exposure` in (0, 1] (0.25 = two stops darker)."""
    return _to_uint8(pixels.astype(np.float64) * exposure)


def gaussian_blur(pixels: np.ndarray, sigma: float) -> np.ndarray:
    """Isotropic Gaussian blur of std `sigma` pixels (each channel; borders reflected)."""
    return _to_uint8(ndimage.gaussian_filter(pixels.astype(np.float64), sigma=(sigma, sigma, 0)))


def rain_layer(
    shape: tuple[int, int],
    density: float,
    seed: int = 0,
    length: int = 17,
    angle_deg: float = 10.0,
    brightness: float = 200.0,
) -> np.ndarray:
    """A rain-streak layer [H, W] in 8-bit levels: `density` = fraction of pixels seeding a streak, each seed
    smeared into a line `length` pixels long at `angle_deg` from vertical (motion blur), peak `brightness`."""
    rng = np.random.default_rng(seed)
    seeds = (rng.random(shape) < density) * rng.uniform(0.5, 1.0, shape)
    kernel = np.zeros((length, length))
    centre, radians = (length - 1) / 2.0, np.deg2rad(angle_deg)
    for step in np.linspace(-centre, centre, 4 * length):
        row = int(round(centre + step * np.cos(radians)))
        column = int(round(centre + step * np.sin(radians)))
        kernel[row, column] = 1.0
    streaks = np.minimum(ndimage.convolve(seeds, kernel, mode="wrap"), 1.0)
    return brightness * ndimage.gaussian_filter(streaks, 0.5)


def rain(pixels: np.ndarray, density: float, seed: int = 0, **layer: float) -> np.ndarray:
    """Additive rain streaks (screen-like add, clipped): I = J + S with S from `rain_layer`."""
    streaks = rain_layer(pixels.shape[:2], density, seed, **layer)
    return _to_uint8(pixels.astype(np.float64) + streaks[..., None])
