"""CUDA paths (skipped without a GPU): bf16 cached vs uncached, compiled forward, sampler determinism on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdsd3_cli.model.heads import all_prompts
from mdsd3_cli.model.prompts import load_prompt_embeddings
from mdsd3_cli.model.sampler import MDSD3Sampler, SampleRequest
from mdsd3_cli.model.weights import build_model, build_tiny, fresh_adapter_config

from .helpers import CLASSES

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def cuda_sampler(tmp_path_factory):
    base = build_tiny(dtype=torch.bfloat16, device="cuda")
    model, config = build_model(base, config=fresh_adapter_config(base, CLASSES))
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for block in model.clean_blocks:
            for z in (block.z_q, block.z_k, block.z_v):
                z.weight.copy_((torch.randn(z.weight.shape, generator=g) * 0.2).to(z.weight))
    prompts = load_prompt_embeddings("tiny", base.fingerprint, all_prompts(CLASSES), tmp_path_factory.mktemp("pc"))
    return MDSD3Sampler(base, model.to("cuda"), config, prompts)


def _photos(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 64, 64, 3), generator=g, dtype=torch.uint8)


def test_cached_matches_uncached_in_bf16(cuda_sampler):
    model = cuda_sampler.model
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 16, 8, 8, device="cuda", generator=g, dtype=torch.bfloat16)
    clean = torch.randn(1, 16, 8, 8, device="cuda", generator=g, dtype=torch.bfloat16)
    e = torch.randn(2, 12, 32, device="cuda", generator=g, dtype=torch.bfloat16)
    p = torch.randn(2, 32, device="cuda", generator=g, dtype=torch.bfloat16)
    t = torch.full((2,), 600.0, device="cuda")
    with torch.no_grad():
        cached = model(x, e, p, t, clean_injections=model.encode_clean(clean)).sample
        uncached = model(x, e, p, t, clean_latents=clean.expand(2, -1, -1, -1)).sample
    torch.testing.assert_close(cached.float(), uncached.float(), atol=2e-2, rtol=2e-2)


def test_compiled_forward_matches_eager(cuda_sampler):
    model = cuda_sampler.model
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 16, 8, 8, device="cuda", dtype=torch.bfloat16)
    e = torch.randn(2, 12, 32, device="cuda", dtype=torch.bfloat16)
    p = torch.randn(2, 32, device="cuda", dtype=torch.bfloat16)
    t = torch.full((2,), 600.0, device="cuda")
    cache = model.encode_clean(torch.randn(1, 16, 8, 8, device="cuda", dtype=torch.bfloat16))
    mask = torch.ones(2, 6, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x, e, p, t, head_mask=mask, clean_injections=cache).sample
        fast = compiled(x, e, p, t, head_mask=mask, clean_injections=cache).sample
    torch.testing.assert_close(fast.float(), eager.float(), atol=3e-2, rtol=3e-2)


def test_gpu_sampler_is_reproducible_and_batch_padded(cuda_sampler):
    requests = [SampleRequest({"rain": 1.0}, seed=s, beta=0.3) for s in range(4)]
    photos = _photos(4)
    first = cuda_sampler.generate(photos, requests, steps=3, guidance=3.0, pad_to=4)
    again = cuda_sampler.generate(photos, requests, steps=3, guidance=3.0, pad_to=4)
    np.testing.assert_array_equal(first, again)
    alone = cuda_sampler.generate(photos[2:3], requests[2:3], steps=3, guidance=3.0, pad_to=4)
    np.testing.assert_array_equal(alone[0], first[2])
