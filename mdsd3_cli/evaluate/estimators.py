"""Classical strength estimators, one pure function each: a `Pair` (two float arrays) in, one number out.

A `Pair` holds the clean and degraded RGB images in 8-bit levels (0-255) as float32 channel planes [3, H, W],
plus the intermediate planes several estimators share (luma, photometric fits, Laplacians), each computed once on first
use. Every class estimator reads 0 on an unchanged image. Most remove the best affine photometric fit of the
degraded image on the clean one first (`photometric_fit`): it absorbs uniform haze and exposure changes, so the
noise, rain and blur estimators are not moved by them.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

LUMA = (0.299, 0.587, 0.114)
"""Rec. 601 luma weights."""
MAD_TO_SIGMA = 1.0 / 0.6744897501960817
"""Median absolute deviation → standard deviation of a normal distribution."""
FIT_BLOCK = 8
"""Side of the blocks averaged before the photometric fit (averages noise away, keeps the haze veil)."""
NOISE_TIE_STEP = 0.5
"""Grid of Haar-HH coefficients of integer images (half a level)."""
CLIP_MARGIN = 1.5
"""Blocks closer than this many sigmas to 0 or 255 are left out of the noise estimate."""
MIN_UNCLIPPED_FRACTION = 0.05
BLUR_TILE_BLOCKS = 4
"""Side, in fit blocks, of the tiles over which `blur_loss` fits the local photometric slope (32 pixels)."""
BLUR_SLOPE_PRIOR = 4.0
"""Variance (8-bit levels²) of block means that weighs as much as the image-wide slope in a tile's slope: flat
tiles take the image-wide slope, textured ones their own."""
SSIM_WINDOW = 7
DEFAULT_SEAM_GRID = 8
"""Pixels between the grid lines the seam measure looks at: the token size of mini (codec ×4, patch 2); SD3's
tokens are 16 pixels (VAE ×8, patch 2)."""

ESTIMATOR_VERSIONS: dict[str, str] = {
    "psnr": "rgb-peak255-1",
    "ssim": "skimage-definition-luma-1",
    "noise": "haar-hh-mad-1",
    "haze": "affine-veil-1",
    "rain": "residual-anisotropy-2",
    "low_light": "luma-stops-1",
    "blur": "laplacian-local-transfer-3",
    "seam": "grid-step-ratio-1",
}
"""Bumped whenever an estimator's output changes; recorded in every report."""


def luminance(planes: np.ndarray) -> np.ndarray:
    """Rec. 601 luma [H, W] of RGB channel planes [3, H, W], in the same units."""
    return LUMA[0] * planes[0] + LUMA[1] * planes[1] + LUMA[2] * planes[2]


def _block_means(planes: np.ndarray, block: int) -> np.ndarray:
    """Means of `block`x`block` tiles of channel planes [C, H, W] → [C, H / block, W / block] (a ragged edge is
    dropped)."""
    channels, height, width = planes.shape[0], planes.shape[1] // block * block, planes.shape[2] // block * block
    rows = planes[:, :height, :width].reshape(channels, height // block, block, width).sum(axis=2)
    tiles = rows.reshape(channels, height // block, width // block, block)
    return tiles.sum(axis=3).astype(np.float64) / (block * block)  # float32 sums of 8-bit values are exact


def photometric_fit(clean_blocks: np.ndarray, degraded_blocks: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line degraded ≈ slope·clean + intercept through the 8x8 block
    means of one plane (`Pair.block_means`). Independent zero-mean noise and sparse additions barely bias the
    slope."""
    x, y = clean_blocks.ravel(), degraded_blocks.ravel()
    x_mean, y_mean = float(x.mean()), float(y.mean())
    variance = float(((x - x_mean) ** 2).mean())
    if variance < 1e-6:  # a flat clean image: no contrast to compare, only the offset
        return 1.0, y_mean - x_mean
    slope = float(((x - x_mean) * (y - y_mean)).mean()) / variance
    return slope, y_mean - slope * x_mean


def haar_diagonal(planes: np.ndarray) -> np.ndarray:
    """The finest orthonormal Haar HH (diagonal detail) band of channel planes [C, H, W]: white noise keeps its
    std."""
    height, width = planes.shape[1] // 2 * 2, planes.shape[2] // 2 * 2
    p = planes[:, :height, :width]
    return (p[:, 0::2, 0::2] - p[:, 0::2, 1::2] - p[:, 1::2, 0::2] + p[:, 1::2, 1::2]) * np.float32(0.5)


def _window_sums(planes: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Sums of `size` consecutive values along `axis` (-2: rows, -1: columns) of [..., H, W], valid positions
    only (that axis shrinks by size − 1): sums over 1, 2, 4, ... values are built by doubling, then the ones
    making up `size` are added (7 = 4 + 2 + 1: four additions instead of six)."""

    def cut(values: np.ndarray, start: int, count: int) -> np.ndarray:
        return values[..., start : start + count, :] if axis == -2 else values[..., start : start + count]

    spans = {1: planes}
    while 2 * max(spans) <= size:
        span = max(spans)
        count = spans[span].shape[axis] - span
        spans[2 * span] = cut(spans[span], 0, count) + cut(spans[span], span, count)
    count, offset, parts = planes.shape[axis] - size + 1, 0, []
    for span in sorted(spans, reverse=True):
        if offset + span <= size:
            parts.append(cut(spans[span], offset, count))
            offset += span
    if len(parts) == 1:
        return parts[0].copy()
    total = parts[0] + parts[1]
    for part in parts[2:]:
        total += part
    return total


def box_mean(planes: np.ndarray, size: int) -> np.ndarray:
    """Mean over every `size`x`size` window fully inside [..., H, W] → [..., H − size + 1, W − size + 1]."""
    return _window_sums(_window_sums(planes, size, -2), size, -1) * np.float32(1.0 / (size * size))


def laplacian(plane: np.ndarray) -> np.ndarray:
    """4-neighbour Laplacian of the interior pixels of [H, W] → [H − 2, W − 2]."""
    return (plane[1:-1, :-2] + plane[1:-1, 2:] + plane[:-2, 1:-1] + plane[2:, 1:-1]) - 4 * plane[1:-1, 1:-1]


def _binomial_smooth(plane: np.ndarray) -> np.ndarray:
    """Separable [1, 4, 6, 4, 1] / 16 smoothing (a Gaussian of std 1 pixel), valid region: [H − 4, W − 4]."""
    rows = (plane[:-4] + plane[4:]) + 4 * (plane[1:-3] + plane[3:-1]) + 6 * plane[2:-2]
    smooth = (rows[:, :-4] + rows[:, 4:]) + 4 * (rows[:, 1:-3] + rows[:, 3:-1]) + 6 * rows[:, 2:-2]
    return smooth * np.float32(1 / 256)


def grid_step_ratio(planes: np.ndarray, grid: int) -> float:
    """Mean |step| between neighbouring pixels across the lines of a `grid`-pixel grid (starting at pixel 0),
    divided by the mean |step| between all other neighbours; both axes, every channel of [C, H, W]. nan when
    either set of steps is empty or the inside steps are all 0 (a flat image)."""
    if grid < 2:
        raise ValueError(f"the seam grid is at least 2 pixels, got {grid}")
    across_columns = np.abs(np.diff(planes, axis=2))  # step from column x to x + 1
    across_rows = np.abs(np.diff(planes, axis=1))
    column_border = np.arange(1, planes.shape[2]) % grid == 0
    row_border = np.arange(1, planes.shape[1]) % grid == 0
    border_sum = float(
        across_columns[:, :, column_border].sum(dtype=np.float64) + across_rows[:, row_border, :].sum(dtype=np.float64)
    )
    total = float(across_columns.sum(dtype=np.float64) + across_rows.sum(dtype=np.float64))
    border_count = planes.shape[0] * (
        planes.shape[1] * int(column_border.sum()) + planes.shape[2] * int(row_border.sum())
    )
    inside_count = across_columns.size + across_rows.size - border_count
    if border_count == 0 or inside_count == 0 or total == border_sum:
        return float("nan")
    return (border_sum / border_count) / ((total - border_sum) / inside_count)


class Reference:
    """A clean RGB image [H, W, 3] (uint8 or float, 0-255) as float32 channel planes [3, H, W], and what the
    estimators derive from it alone, each computed once: every degraded version of one clean image (its
    variants and repeats) reuses them."""

    def __init__(self, clean: np.ndarray) -> None:
        clean = np.asarray(clean)
        if clean.ndim != 3 or clean.shape[2] != 3:
            raise ValueError(f"expected an RGB array [H, W, 3], got {clean.shape}")
        self.planes = np.moveaxis(clean, 2, 0).astype(np.float32, order="C")
        self._step_ratios: dict[int, float] = {}

    def step_ratio(self, grid: int) -> float:
        """`grid_step_ratio` of the clean image, computed once per grid."""
        if grid not in self._step_ratios:
            self._step_ratios[grid] = grid_step_ratio(self.planes, grid)
        return self._step_ratios[grid]

    @cached_property
    def luma(self) -> np.ndarray:
        return luminance(self.planes)

    @cached_property
    def block_means(self) -> np.ndarray:
        """8x8 block means [3, h, w] (float64)."""
        return _block_means(self.planes, FIT_BLOCK)

    @cached_property
    def detail(self) -> np.ndarray:
        """Laplacian of the luma (the finest detail), interior pixels [H − 2, W − 2]."""
        return laplacian(self.luma)

    @cached_property
    def detail_energy(self) -> float:
        return float(np.mean(np.square(self.detail), dtype=np.float64))

    @cached_property
    def block_extremes(self) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest value of each 2x2 block of each channel (the Haar-HH grid), flattened."""
        height, width = self.planes.shape[1] // 2 * 2, self.planes.shape[2] // 2 * 2
        corners = [self.planes[:, row:height:2, column:width:2] for row in (0, 1) for column in (0, 1)]
        low = np.minimum(np.minimum(corners[0], corners[1]), np.minimum(corners[2], corners[3])).ravel()
        high = np.maximum(np.maximum(corners[0], corners[1]), np.maximum(corners[2], corners[3])).ravel()
        return low, high

    @cached_property
    def window_moments(self) -> np.ndarray:
        """SSIM windows' mean of the luma and of its square, stacked [2, H − 6, W − 6]."""
        return box_mean(np.stack([self.luma, self.luma * self.luma]), SSIM_WINDOW)


class Pair:
    """A clean image (array or `Reference`) and a degraded RGB image [H, W, 3] of the same shape, kept as float32
    channel planes [3, H, W], and the planes the estimators share, each computed once."""

    def __init__(self, clean: np.ndarray | Reference, degraded: np.ndarray) -> None:
        self.reference = clean if isinstance(clean, Reference) else Reference(clean)
        degraded = np.asarray(degraded)
        if degraded.shape != self.reference.planes.shape[1:] + (3,):
            raise ValueError(
                f"expected two RGB arrays [H, W, 3] of one shape, got "
                f"{self.reference.planes.shape[1:] + (3,)} and {degraded.shape}"
            )
        self.clean = self.reference.planes
        self.degraded = np.moveaxis(degraded, 2, 0).astype(np.float32, order="C")

    @property
    def clean_luma(self) -> np.ndarray:
        return self.reference.luma

    @cached_property
    def degraded_luma(self) -> np.ndarray:
        return luminance(self.degraded)

    @cached_property
    def block_means(self) -> tuple[np.ndarray, np.ndarray]:
        """8x8 block means [3, h, w] of the clean and the degraded image (float64)."""
        return self.reference.block_means, _block_means(self.degraded, FIT_BLOCK)

    @cached_property
    def luma_fit(self) -> tuple[float, float]:
        clean, degraded = self.block_means
        return photometric_fit(luminance(clean), luminance(degraded))

    @cached_property
    def channel_fits(self) -> list[tuple[float, float]]:
        clean, degraded = self.block_means
        return [photometric_fit(clean[c], degraded[c]) for c in range(3)]


def psnr(pair: Pair) -> float:
    """Peak signal-to-noise ratio in dB (peak 255) over all channels; inf for identical images."""
    mse = float(np.mean(np.square(pair.degraded - pair.clean)))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(255.0**2 / mse))


def ssim(pair: Pair) -> float:
    """Structural similarity of the luma planes, 1 = identical: scikit-image's `structural_similarity` definition
    (Wang et al. 2004; 7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance, data range 255, mean over
    the windows that fit inside the image), computed with box sums (several times faster; the tests check it
    equals scikit-image's value)."""
    x, y = pair.clean_luma, pair.degraded_luma
    mean_x, mean_xx = pair.reference.window_moments
    mean_y, mean_yy, mean_xy = box_mean(np.stack([y, y * y, x * y]), SSIM_WINDOW)
    correction = np.float32(SSIM_WINDOW**2 / (SSIM_WINDOW**2 - 1.0))
    var_x = (mean_xx - mean_x * mean_x) * correction
    var_y = (mean_yy - mean_y * mean_y) * correction
    cov = (mean_xy - mean_x * mean_y) * correction
    c1, c2 = (0.01 * 255.0) ** 2, (0.03 * 255.0) ** 2
    numerator = (2 * mean_x * mean_y + c1) * (2 * cov + c2)
    index = numerator / ((mean_x * mean_x + mean_y * mean_y + c1) * (var_x + var_y + c2))
    return float(np.mean(index, dtype=np.float64))


def _median(values: np.ndarray) -> float:
    """The (upper) median of a flat array, by one partial sort (np.median is several times slower)."""
    middle = values.size // 2
    return float(np.partition(values, middle)[middle])


def _tie_aware_median(values: np.ndarray, step: float) -> float:
    """Median of `values`; when many equal values straddle it (8-bit data gives ties on a grid of `step`),
    the median is interpolated inside that grid cell as for grouped data, so it moves smoothly."""
    middle = _median(values)
    below, equal = int(np.count_nonzero(values < middle)), int(np.count_nonzero(values == middle))
    if equal <= 1:
        return middle
    return max(0.0, middle - step / 2 + step * (values.size / 2 - below) / equal)


def noise_sigma(pair: Pair) -> float:
    """Noise std in 8-bit levels (per channel): the median absolute finest Haar-HH coefficient of the
    photometric residual, divided by 0.6745 (Donoho's robust estimator). Clipping at 0/255 shrinks noise, so
    a second pass keeps only the 2x2 blocks whose clean pixels lie 1.5 first-pass sigmas away from both ends
    (when at least 5% of blocks do)."""
    slopes = np.array([slope for slope, _ in pair.channel_fits], dtype=np.float32)[:, None, None]
    magnitudes = np.abs(haar_diagonal(pair.degraded - slopes * pair.clean)).ravel()
    sigma = _tie_aware_median(magnitudes, NOISE_TIE_STEP) * MAD_TO_SIGMA
    low, high = pair.reference.block_extremes
    away = (low >= CLIP_MARGIN * sigma) & (high <= 255.0 - CLIP_MARGIN * sigma)
    if away.mean() >= MIN_UNCLIPPED_FRACTION:
        sigma = _tie_aware_median(magnitudes[away], NOISE_TIE_STEP) * MAD_TO_SIGMA
    return float(sigma)


def haze_veil(pair: Pair) -> float:
    """Airlight veil as a fraction of full scale (0-1): (1 − t)·A / 255 under Koschmieder's model
    I = t·J + (1 − t)·A, with t the photometric fit's slope and the veil the median of I − t·J over every
    second pixel (sparse bright additions such as rain streaks do not move a median), averaged over channels.
    Darkening reads 0."""
    clean, degraded = pair.clean[:, ::2, ::2], pair.degraded[:, ::2, ::2]
    veils = [
        _median((degraded[c] - np.float32(slope) * clean[c]).ravel()) for c, (slope, _) in enumerate(pair.channel_fits)
    ]
    return max(0.0, float(np.mean(veils)) / 255.0)


def rain_streaks(pair: Pair) -> float:
    """Oriented streak energy in 8-bit levels per pixel: sqrt(λ1 − λ2) of the image-wide structure tensor of the
    luma photometric residual (gradients of its Gaussian-smoothed version, σ ≈ 1 px), after removing the part of
    the residual that follows the clean image's Laplacian (blur or sharpening). Isotropic changes (noise)
    cancel; streaks sharing one direction add up."""
    slope, intercept = pair.luma_fit
    residual = (pair.degraded_luma - (slope * pair.clean_luma + np.float32(intercept)))[1:-1, 1:-1]
    detail, energy = pair.reference.detail, pair.reference.detail_energy
    if energy > 1e-6:
        residual -= np.float32(float(np.mean(residual * detail, dtype=np.float64)) / energy) * detail
    smooth = _binomial_smooth(residual)
    gx = (smooth[1:-1, 2:] - smooth[1:-1, :-2]) * np.float32(0.5)
    gy = (smooth[2:, 1:-1] - smooth[:-2, 1:-1]) * np.float32(0.5)
    jxx, jyy = float(np.mean(gx * gx, dtype=np.float64)), float(np.mean(gy * gy, dtype=np.float64))
    jxy = float(np.mean(gx * gy, dtype=np.float64))
    return float(np.sqrt(np.hypot(jxx - jyy, 2.0 * jxy)))


def low_light_stops(pair: Pair) -> float:
    """Exposure loss in stops (EV): log2(mean clean luma / mean degraded luma), 0 when not darker."""
    clean_mean = float(np.mean(pair.clean_luma, dtype=np.float64))
    degraded_mean = float(np.mean(pair.degraded_luma, dtype=np.float64))
    return max(0.0, float(np.log2((clean_mean + 1.0) / (degraded_mean + 1.0))))


def _tile_sums(plane: np.ndarray, blocks: int) -> np.ndarray:
    """Sums over tiles of `blocks` fit blocks (FIT_BLOCK pixels each) of an [H, W] plane → [h, w] (float64)."""
    side = blocks * FIT_BLOCK
    return _block_means(plane[None], side)[0] * (side * side)


def local_slopes(clean_blocks: np.ndarray, degraded_blocks: np.ndarray, blocks: int, prior: float) -> np.ndarray:
    """Least-squares slope of degraded on clean block means (one plane, [h, w]) within each tile of
    `blocks`x`blocks` blocks → [h / blocks, w / blocks], shrunk towards the image-wide slope by a `prior`
    variance: spatially varying gains (haze with depth, a tone curve) are followed where the tile has contrast."""
    overall, _ = photometric_fit(clean_blocks, degraded_blocks)
    rows, columns = clean_blocks.shape[0] // blocks * blocks, clean_blocks.shape[1] // blocks * blocks

    def tiles(values: np.ndarray) -> np.ndarray:
        return values[:rows, :columns].reshape(rows // blocks, blocks, columns // blocks, blocks).mean(axis=(1, 3))

    x_mean, y_mean = tiles(clean_blocks), tiles(degraded_blocks)
    variance = tiles(clean_blocks * clean_blocks) - x_mean * x_mean
    covariance = tiles(clean_blocks * degraded_blocks) - x_mean * y_mean
    return (covariance + prior * overall) / (variance + prior)


def blur_loss(pair: Pair) -> float:
    """Fraction (0-1) of the finest-scale detail lost: 1 − Σ⟨L(d), L(c)⟩ / Σ slope·⟨L(c), L(c)⟩ over 32-pixel
    tiles, with L the Laplacian of luma and slope the tile's photometric slope (`local_slopes`), so haze, even
    with depth, and exposure or a tone curve do not count. Noise, being uncorrelated with the clean detail,
    does not count either."""
    clean_blocks, degraded_blocks = (luminance(blocks) for blocks in pair.block_means)
    slopes = local_slopes(clean_blocks, degraded_blocks, BLUR_TILE_BLOCKS, BLUR_SLOPE_PRIOR)
    detail = pair.reference.detail
    product = np.zeros_like(pair.clean_luma)
    energy = np.zeros_like(pair.clean_luma)
    product[1:-1, 1:-1] = laplacian(pair.degraded_luma) * detail
    energy[1:-1, 1:-1] = detail * detail
    product_sums, energy_sums = _tile_sums(product, BLUR_TILE_BLOCKS), _tile_sums(energy, BLUR_TILE_BLOCKS)
    expected = float(np.sum(np.clip(slopes, 0.0, None) * energy_sums))
    if float(energy_sums.sum()) < 1e-6 or expected <= 1e-6 * float(energy_sums.sum()):
        return 0.0
    return float(np.clip(1.0 - float(product_sums.sum()) / expected, 0.0, 1.0))


def seam_ratio(pair: Pair, grid: int = DEFAULT_SEAM_GRID) -> float:
    """Seams along a `grid`-pixel grid (a model's token mosaic): the degraded image's `grid_step_ratio` over the
    clean image's, so about 1.0 when the degradation adds no seams (whatever the photo's own edges), above 1
    when steps across the grid lines grew more than the others. nan when either ratio is undefined or the clean
    image's is 0 (no step at all across its grid lines)."""
    clean = pair.reference.step_ratio(grid)
    if not np.isfinite(clean) or clean == 0:
        return float("nan")
    return grid_step_ratio(pair.degraded, grid) / clean


def repeat_diversity(images: list[np.ndarray]) -> float:
    """Mean absolute pixel difference in 8-bit levels, averaged over every pair of images (repeats of one
    sample); 0 when they are identical. Needs at least two images of one shape."""
    if len(images) < 2:
        raise ValueError("repeat diversity needs at least two images")
    differences = [
        float(np.mean(np.abs(np.asarray(a, np.float32) - b), dtype=np.float64))
        for index, a in enumerate(images)
        for b in images[index + 1 :]
    ]
    return float(np.mean(differences))
