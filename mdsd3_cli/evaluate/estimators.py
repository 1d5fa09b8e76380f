"""Classical strength estimators, one pure function each: (clean, degraded) float arrays in, one number out.

Inputs are RGB arrays [H, W, 3] of 8-bit levels (0-255, any float dtype), the same shape. Each class estimator
reads 0 on an unchanged image. Before measuring, most estimators remove the best affine photometric fit of the
degraded image on the clean one (`photometric_fit`): that fit absorbs uniform haze and exposure changes, so
the noise, rain and blur estimators are not moved by them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

LUMA = np.array([0.299, 0.587, 0.114])
MAD_TO_SIGMA = 1.0 / 0.6744897501960817
"""Median absolute deviation → standard deviation of a normal distribution."""
FIT_BLOCK = 8
"""Side of the blocks averaged before the photometric fit (averages noise away, keeps the haze veil)."""
NOISE_TIE_STEP = 0.5
"""Grid of Haar-HH coefficients of integer images (half a level)."""
CLIP_MARGIN = 1.5
"""Blocks closer than this many sigmas to 0 or 255 are left out of the noise estimate."""
MIN_UNCLIPPED_FRACTION = 0.05
STREAK_SCALE = 1.0
"""Std in pixels of the Gaussian derivative behind the rain estimator's gradients."""

ESTIMATOR_VERSIONS: dict[str, str] = {
    "psnr": "skimage-1",
    "ssim": "skimage-luma-1",
    "noise": "haar-hh-mad-1",
    "haze": "affine-veil-1",
    "rain": "residual-anisotropy-1",
    "low_light": "luma-stops-1",
    "blur": "laplacian-transfer-1",
}
"""Bumped whenever an estimator's output changes; recorded in every report."""


def luminance(pixels: np.ndarray) -> np.ndarray:
    """Rec. 601 luma [H, W] of RGB pixels [H, W, 3], in the same units."""
    return LUMA[0] * pixels[..., 0] + LUMA[1] * pixels[..., 1] + LUMA[2] * pixels[..., 2]


def _block_means(plane: np.ndarray, block: int) -> np.ndarray:
    height, width = (plane.shape[0] // block) * block, (plane.shape[1] // block) * block
    return plane[:height, :width].reshape(height // block, block, width // block, block).mean(axis=(1, 3))


def photometric_fit(clean: np.ndarray, degraded: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line degraded ≈ slope·clean + intercept, on 8x8 block means of
    one plane [H, W]. Independent zero-mean noise and sparse additions barely bias the slope."""
    x, y = _block_means(clean, FIT_BLOCK).ravel(), _block_means(degraded, FIT_BLOCK).ravel()
    x_mean, y_mean = float(x.mean()), float(y.mean())
    variance = float(((x - x_mean) ** 2).mean())
    if variance < 1e-6:  # a flat clean image: no contrast to compare, only the offset
        return 1.0, y_mean - x_mean
    slope = float(((x - x_mean) * (y - y_mean)).mean()) / variance
    return slope, y_mean - slope * x_mean


def _photometric_residual(clean: np.ndarray, degraded: np.ndarray) -> np.ndarray:
    """Degraded minus the affine fit of the clean image, per channel: [H, W, 3]."""
    residual = np.empty(degraded.shape, dtype=np.float64)
    for channel in range(degraded.shape[2]):
        slope, intercept = photometric_fit(clean[..., channel], degraded[..., channel])
        residual[..., channel] = degraded[..., channel] - (slope * clean[..., channel] + intercept)
    return residual


def psnr(clean: np.ndarray, degraded: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (peak 255) over all channels; inf for identical images."""
    mse = float(np.mean((np.asarray(degraded, np.float64) - clean) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def ssim(clean: np.ndarray, degraded: np.ndarray) -> float:
    """Structural similarity (scikit-image, 7x7 window, data range 255) of the luma planes; 1 = identical."""
    return float(structural_similarity(luminance(clean), luminance(degraded), data_range=255.0))


def haar_diagonal(plane: np.ndarray) -> np.ndarray:
    """The finest orthonormal Haar HH (diagonal detail) band of a plane [H, W]: white noise keeps its std."""
    height, width = plane.shape[0] // 2 * 2, plane.shape[1] // 2 * 2
    p = plane[:height, :width]
    return (p[0::2, 0::2] - p[0::2, 1::2] - p[1::2, 0::2] + p[1::2, 1::2]) / 2.0


def _tie_aware_median(values: np.ndarray, step: float) -> float:
    """Median of `values`; when many equal values straddle it (8-bit data gives ties on a grid of `step`),
    the median is interpolated inside that grid cell as for grouped data, so it moves smoothly."""
    middle = float(np.median(values))
    below, equal = int(np.count_nonzero(values < middle)), int(np.count_nonzero(values == middle))
    if equal <= 1:
        return middle
    return max(0.0, middle - step / 2 + step * (values.size / 2 - below) / equal)


def noise_sigma(clean: np.ndarray, degraded: np.ndarray) -> float:
    """Noise std in 8-bit levels (per channel): the median absolute finest Haar-HH coefficient of the
    photometric residual, divided by 0.6745 (Donoho's robust estimator). Clipping at 0/255 shrinks noise, so
    a second and third pass keep only 2x2 blocks whose clean pixels lie 1.5 estimated sigmas away from both
    ends (when at least 5% of blocks do)."""
    residual = _photometric_residual(clean, degraded)
    coefficients, lowest, highest = [], [], []
    for channel in range(residual.shape[2]):
        band = haar_diagonal(residual[..., channel])
        rows, columns = band.shape
        blocks = np.asarray(clean[: 2 * rows, : 2 * columns, channel]).reshape(rows, 2, columns, 2)
        coefficients.append(np.abs(band).ravel())
        lowest.append(blocks.min(axis=(1, 3)).ravel())
        highest.append(blocks.max(axis=(1, 3)).ravel())
    magnitudes, low, high = np.concatenate(coefficients), np.concatenate(lowest), np.concatenate(highest)
    sigma = _tie_aware_median(magnitudes, NOISE_TIE_STEP) * MAD_TO_SIGMA
    for _ in range(2):
        away = (low >= CLIP_MARGIN * sigma) & (high <= 255.0 - CLIP_MARGIN * sigma)
        if away.mean() < MIN_UNCLIPPED_FRACTION:
            break
        sigma = _tie_aware_median(magnitudes[away], NOISE_TIE_STEP) * MAD_TO_SIGMA
    return float(sigma)


def haze_veil(clean: np.ndarray, degraded: np.ndarray) -> float:
    """Airlight veil as a fraction of full scale (0-1): (1 − t)·A / 255 under Koschmieder's model
    I = t·J + (1 − t)·A, with t the photometric fit's slope and the veil the per-pixel median of I − t·J
    (sparse bright additions such as rain streaks do not move a median), averaged over channels.
    Darkening reads 0."""
    veils = []
    for channel in range(degraded.shape[2]):
        slope, _ = photometric_fit(clean[..., channel], degraded[..., channel])
        veils.append(float(np.median(degraded[..., channel] - slope * clean[..., channel])))
    return max(0.0, float(np.mean(veils)) / 255.0)


def rain_streaks(clean: np.ndarray, degraded: np.ndarray) -> float:
    """Oriented streak energy in 8-bit levels per pixel: sqrt(λ1 − λ2) of the image-wide structure tensor of the
    luma photometric residual (Gaussian derivatives, σ = 1 px). Isotropic changes (noise) cancel; streaks
    sharing one direction add up."""
    clean_luma, degraded_luma = luminance(clean), luminance(degraded)
    slope, intercept = photometric_fit(clean_luma, degraded_luma)
    residual = degraded_luma - (slope * clean_luma + intercept)
    detail = ndimage.laplace(clean_luma)
    energy = float(np.mean(detail * detail))
    if energy > 1e-6:  # what blur or sharpening did to the clean edges is not rain
        residual -= float(np.mean(residual * detail)) / energy * detail
    gx = ndimage.gaussian_filter(residual, STREAK_SCALE, order=(0, 1))
    gy = ndimage.gaussian_filter(residual, STREAK_SCALE, order=(1, 0))
    jxx, jyy, jxy = float(np.mean(gx * gx)), float(np.mean(gy * gy)), float(np.mean(gx * gy))
    return float(np.sqrt(np.hypot(jxx - jyy, 2.0 * jxy)))


def low_light_stops(clean: np.ndarray, degraded: np.ndarray) -> float:
    """Exposure loss in stops (EV): log2(mean clean luma / mean degraded luma), 0 when not darker."""
    ratio = (float(luminance(clean).mean()) + 1.0) / (float(luminance(degraded).mean()) + 1.0)
    return max(0.0, float(np.log2(ratio)))


def blur_loss(clean: np.ndarray, degraded: np.ndarray) -> float:
    """Fraction (0-1) of the finest-scale detail lost: 1 − ⟨L(d), L(c)⟩ / (slope·⟨L(c), L(c)⟩) with L the
    Laplacian of luma and slope the photometric fit's (so haze and exposure do not count). Noise, being
    uncorrelated with the clean detail, does not count either."""
    clean_luma, degraded_luma = luminance(clean), luminance(degraded)
    slope, _ = photometric_fit(clean_luma, degraded_luma)
    clean_detail = ndimage.laplace(clean_luma)
    energy = float(np.mean(clean_detail * clean_detail))
    if energy < 1e-6 or slope <= 1e-6:
        return 0.0
    transfer = float(np.mean(ndimage.laplace(degraded_luma) * clean_detail)) / (slope * energy)
    return float(np.clip(1.0 - transfer, 0.0, 1.0))


def repeat_diversity(images: list[np.ndarray]) -> float:
    """Mean absolute pixel difference in 8-bit levels, averaged over every pair of images (repeats of one
    sample); 0 when they are identical. Needs at least two images of one shape."""
    if len(images) < 2:
        raise ValueError("repeat diversity needs at least two images")
    differences = [float(np.mean(np.abs(np.asarray(a, np.float64) - b)))
                   for index, a in enumerate(images) for b in images[index + 1:]]
    return float(np.mean(differences))
