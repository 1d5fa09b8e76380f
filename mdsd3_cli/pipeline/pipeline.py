"""`MDSD3Pipeline`: the loaded model, its prompt embeddings and the sampler as one object, in diffusers'
pipeline shape: components held (base, transformer, adapter), built by `from_recipe`, called with per-call
settings (steps, guidance). `generate`, the `Synthesizer`, `calibrate`, training previews and `mdsd3 info` all
run the model through it."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import rich.console
import torch

from mdsd3_cli.model.adapter import AdapterConfig
from mdsd3_cli.model.heads import UNCONDITIONAL_PROMPT, prompt_for
from mdsd3_cli.model.prompts import PromptEmbedding, load_prompt_embeddings
from mdsd3_cli.model.sampler import MDSD3Sampler, SampleRequest, is_guided
from mdsd3_cli.model.transformer import MDSD3Transformer
from mdsd3_cli.model.weights import BaseModel, build_model, fingerprint_adapter, fresh_adapter_config, load_base
from mdsd3_cli.recipe.generate import Recipe
from mdsd3_cli.util.progress import Console
from mdsd3_cli.util.runtime import is_out_of_memory, resolve_dtype


class SamplingMemoryError(ValueError):
    """Out of memory even at batch size 1: the images are too large for this device."""


def needed_prompts(requests: Iterable[SampleRequest], classes: Sequence[str], guidance: float) -> list[str]:
    """The prompts a list of requests needs: each sample's, and without each class it guides (class guidance),
    plus the unconditional one when guided."""
    prompts = set()
    for request in requests:
        prompts.add(prompt_for(request.ratios, classes))
        prompts.update(prompt_for(request.without(name), classes) for name in request.class_guidance)
    if is_guided(guidance):
        prompts.add(UNCONDITIONAL_PROMPT)
    return sorted(prompts)


class MDSD3Pipeline:
    """An MDSD3 model ready to sample: `pipeline(batch, steps, guidance)` degrades one batch of (request, uint8
    [H, W, 3] pixels), padded to the batch size, with out-of-memory back-off (GPU and CPU alike): the batch size
    halves and the batch is retried in parts; at batch size 1 a SamplingMemoryError says what to change.

    `model` is the MDSD3 transformer as loaded; the sampler runs `transformer` (the same, or it compiled).
    Prompts missing from the embeddings are taken from `prompt_cache` (encoded once) when first needed."""

    def __init__(
        self,
        base: BaseModel,
        model: MDSD3Transformer,
        adapter: AdapterConfig,
        prompts: Mapping[str, PromptEmbedding] | None = None,
        *,
        transformer: torch.nn.Module | None = None,
        grid_shifts: int = 1,
        batch_size: int = 1,
        adapter_fingerprint: str | None = None,
        prompt_cache: str | os.PathLike | None = None,
        console: rich.console.Console | None = None,
    ) -> None:
        self.base, self.model, self.adapter = base, model, adapter
        self.adapter_fingerprint, self.prompt_cache = adapter_fingerprint, prompt_cache
        self.sampler = MDSD3Sampler(base, transformer or model, adapter, prompts or {}, grid_shifts)
        self.batch_size = batch_size
        self.console = console or Console(stderr=True)

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        console: rich.console.Console | None = None,
    ) -> MDSD3Pipeline:
        """The recipe's base and adapter (or a fresh one with the recipe's classes) on `device` in `dtype` (default:
        model.device and model.dtype), compiled when model.compile, sampling with its grid_shifts and batch_size."""
        device = recipe.device() if device is None else device
        dtype = resolve_dtype(recipe.model.dtype, device) if dtype is None else dtype
        base = load_base(recipe.model.base if recipe.base_dir() is None else str(recipe.base_dir()), dtype, device)
        adapter_dir = recipe.adapter_dir()
        fresh = None if adapter_dir else fresh_adapter_config(base, recipe.classes())
        model, config = build_model(base, adapter_dir, config=fresh)
        model.to(device).eval()
        return cls(
            base,
            model,
            config,
            transformer=torch.compile(model) if recipe.model.compile else model,
            grid_shifts=recipe.sampling.grid_shifts,
            batch_size=recipe.sampling.batch_size,
            adapter_fingerprint=fingerprint_adapter(adapter_dir) if adapter_dir else None,
            prompt_cache=recipe.prompt_cache_dir(),
            console=console,
        )

    @property
    def classes(self) -> list[str]:
        return list(self.adapter.classes)

    @property
    def device(self) -> torch.device:
        return self.sampler.device

    def embed(self, prompts: Iterable[str]) -> None:
        """Make sure `prompts` have embeddings: those missing come from the prompt cache (encoded when not there)."""
        missing = [prompt for prompt in prompts if prompt not in self.sampler.prompts]
        if missing and self.prompt_cache is not None:
            base = self.base
            self.sampler.prompts.update(
                load_prompt_embeddings(
                    base.source, base.fingerprint, missing, self.prompt_cache, base.vae.device, base.vae.dtype
                )
            )

    def __call__(self, batch: Sequence[tuple[SampleRequest, np.ndarray]], steps: int, guidance: float) -> np.ndarray:
        if len(batch) > self.batch_size:  # formed before the batch size was lowered
            parts = [batch[start : start + self.batch_size] for start in range(0, len(batch), self.batch_size)]
            return np.concatenate([self(part, steps, guidance) for part in parts])
        try:
            pixels = torch.from_numpy(np.stack([image for _, image in batch]))
            requests = [request for request, _ in batch]
            return self.sampler.generate(pixels, requests, steps, guidance, pad_to=self.batch_size)
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.batch_size == 1:
            raise SamplingMemoryError(
                f"out of memory on {self.device} at batch size 1 with {batch[0][1].shape[1]}x"
                f"{batch[0][1].shape[0]} images; use a smaller input.size or "
                "input.max_side, or a device with more memory"
            ) from None
        self.batch_size = max(1, min(self.batch_size, len(batch)) // 2)
        self.console.print(f"[yellow]out of memory on {self.device}: batch size lowered to {self.batch_size}[/]")
        return self(batch, steps, guidance)

    def sample(
        self, pixels: Sequence[np.ndarray], requests: Sequence[SampleRequest], steps: int, guidance: float
    ) -> list[np.ndarray]:
        """Degrade fitted uint8 [H, W, 3] images, batched as `generate` batches them: images of one size together,
        the batch size at a time (lowered after an out-of-memory error); their prompts embedded first."""
        self.embed(needed_prompts(requests, self.classes, guidance))
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, image in enumerate(pixels):
            by_shape[image.shape].append(index)
        outputs: list[np.ndarray] = [np.empty(0, np.uint8)] * len(pixels)
        for indexes in by_shape.values():
            while indexes:
                batch, indexes = indexes[: self.batch_size], indexes[self.batch_size :]
                for index, output in zip(batch, self([(requests[i], pixels[i]) for i in batch], steps, guidance)):
                    outputs[index] = output
        return outputs
