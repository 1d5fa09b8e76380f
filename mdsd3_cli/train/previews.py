"""Preview grids of a training run (OUT/previews/step-N.png): a fixed batch of clean images, sampled with each
class alone and all of them together."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from mdsd3_cli.model.adapter import AdapterConfig, FlowStart
from mdsd3_cli.model.prompts import PromptEmbedding
from mdsd3_cli.model.sampler import SampleRequest
from mdsd3_cli.model.transformer import MDSD3Transformer
from mdsd3_cli.model.weights import BaseModel
from mdsd3_cli.pipeline.pipeline import MDSD3Pipeline
from mdsd3_cli.train.data import Draw, PairedDataset

if TYPE_CHECKING:
    from PIL import Image

PREVIEWS = "previews"


@dataclass(frozen=True)
class PreviewSettings:
    """How preview grids are sampled: few steps on a fixed batch of up to `images` pairs' clean images, from the
    start the run trains for (`train.start`) unless `start` is given, each step averaged over `grid_shifts` token
    grids (`sampling.grid_shifts`)."""

    images: int = 4
    steps: int = 12
    guidance: float = 4.0
    start: FlowStart | None = None
    seed: int = 1234
    grid_shifts: int = 1


def preview_pipeline(
    base: BaseModel,
    model: MDSD3Transformer,
    adapter: AdapterConfig,
    prompts: Mapping[str, PromptEmbedding],
    settings: PreviewSettings,
) -> MDSD3Pipeline:
    """The pipeline a preview grid is sampled with: the model in training, its prompts, the settings' grid shifts,
    a whole column in one batch."""
    return MDSD3Pipeline(base, model, adapter, prompts, grid_shifts=settings.grid_shifts, batch_size=settings.images)


def preview_columns(classes: Sequence[str]) -> list[tuple[str, dict[str, float]]]:
    """(label, ratios) of each generated column: every class alone, then all of them together."""
    columns = [(name, {name: 1.0}) for name in classes]
    if len(classes) > 1:
        columns.append(("+".join(classes), {name: 1.0 for name in classes}))
    return columns


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def preview_pixels(dataset: PairedDataset, count: int) -> torch.Tensor:
    """Centre crops of up to `count` pairs spread over the dataset (distinct clean images), uint8 [B, R, R, 3]."""
    chosen, seen = [], set()
    for index in np.linspace(0, len(dataset.pairs) - 1, num=min(len(dataset.pairs), 4 * count)).round().astype(int):
        pair = dataset.pairs[int(index)]
        if pair.clean in seen:
            continue
        try:
            sample = dataset.load(Draw(int(index), identity=False, flip=False, crop_x=0.5, crop_y=0.5))
        except Exception:  # an unusable pair is simply not previewed  # noqa: BLE001
            continue
        seen.add(pair.clean)
        chosen.append(sample["clean"])
        if len(chosen) == count:
            break
    if not chosen:
        return torch.empty(0, dataset.data.resolution, dataset.data.resolution, 3, dtype=torch.uint8)
    return _to_uint8(torch.stack(chosen))


def render_preview(
    pipeline: MDSD3Pipeline, pixels: torch.Tensor, classes: Sequence[str], settings: PreviewSettings
) -> Image.Image:
    """A grid: one row per image, columns clean | each class | all classes, labelled on top."""
    from PIL import Image, ImageDraw

    start = settings.start or pipeline.adapter.start
    columns = [("clean", pixels.numpy())]
    for label, ratios in preview_columns(classes):
        batch = [
            (SampleRequest(ratios, settings.seed + row, start.alpha, start.beta), image)
            for row, image in enumerate(pixels.numpy())
        ]
        columns.append((label, pipeline(batch, settings.steps, settings.guidance)))
    rows, size = len(pixels), pixels.shape[1]
    header = 14
    grid = Image.new("RGB", (size * len(columns), header + size * rows), "white")
    draw = ImageDraw.Draw(grid)
    for col, (label, images) in enumerate(columns):
        draw.text((col * size + 3, 1), label, fill="black")
        for row in range(rows):
            grid.paste(Image.fromarray(images[row]), (col * size, header + row * size))
    return grid
