"""Token-grid shift averaging (`sampling.grid_shifts`, docs/METHOD.md §6): which latent rolls a denoising step
averages over, and the roll itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GRID_SHIFTS = (1, 2, 4)
"""How many token grids a step's velocity may be averaged over."""


def grid_offsets(shifts: int, patch_size: int) -> list[tuple[int, int]]:
    """(rows, columns) latent rolls of the token grids averaged by `shifts`: 1 the grid itself; 2 also the grid
    moved by half a token diagonally; 4 also half a token down and half across."""
    if shifts not in GRID_SHIFTS:
        raise ValueError(f"grid shifts must be one of {GRID_SHIFTS}, got {shifts}")
    half = patch_size // 2
    if shifts > 1 and half == 0:
        raise ValueError(
            f"grid shifts need tokens of at least 2 latent pixels (this model's patch size is {patch_size})"
        )
    return {1: [(0, 0)], 2: [(0, 0), (half, half)], 4: [(0, 0), (0, half), (half, 0), (half, half)]}[shifts]


def roll(latents: torch.Tensor, offset: tuple[int, int], sign: int = 1) -> torch.Tensor:
    """Latents [B, C, H, W] rolled (circularly) by `offset` rows and columns, or back with `sign` -1."""
    if offset == (0, 0):
        return latents
    return latents.roll((sign * offset[0], sign * offset[1]), dims=(2, 3))
