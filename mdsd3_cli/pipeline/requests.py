"""What one sample asks of the model, built in one place: seed -> ratios -> α/β -> `SampleRequest`.

A sample's seed comes from (recipe seed, key, variant name, repeat), its ratios are drawn from that seed, and its
α and β are the variant's (else sampling.alpha and sampling.beta). `generate`'s plan, `DegradedPairs` and
`calibrate` all build their requests with `sample_request`, so the same sample gets the same bytes everywhere.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence

from mdsd3_cli.model.sampler import SampleRequest
from mdsd3_cli.recipe.generate import QuantileRatio, Recipe, Variant


def sample_seed(recipe_seed: int, key: str, variant: str, repeat: int) -> int:
    """A sample's seed: sha256 of the canonical JSON of (recipe seed, key, variant, repeat), 63 bits."""
    canonical = json.dumps([recipe_seed, key, variant, repeat], ensure_ascii=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def draw_ratios(variant: Variant, classes: Sequence[str], seed: int) -> dict[str, float]:
    """Concrete ratios for every class, in class order (absent class: 0.0).

    One uniform number per class is drawn from `random.Random(seed)` in class order, whatever the variant
    says; a range [lo, hi] maps it linearly, `{quantiles: [...]}` through its quantile function (inverse CDF). So a
    draw depends only on the sample's seed and its own class's spec.
    """
    rng = random.Random(seed)
    ratios = {}
    for name in classes:
        unit = rng.random()
        spec = variant.classes.get(name, 0.0)
        if isinstance(spec, QuantileRatio):
            ratios[name] = spec.at(unit)
        elif isinstance(spec, list):
            ratios[name] = spec[0] + (spec[1] - spec[0]) * unit
        else:
            ratios[name] = float(spec)
    return ratios


def sample_request(recipe: Recipe, key: str, variant: Variant, repeat: int, classes: Sequence[str]) -> SampleRequest:
    """Repeat `repeat` of `variant` for the input `key`: its seed, the ratios drawn from it for `classes`, the
    variant's α and β, and the class guidance of the classes it draws."""
    seed = sample_seed(recipe.sampling.seed, key, variant.name, repeat)
    ratios = draw_ratios(variant, classes, seed)
    return SampleRequest(
        ratios,
        seed,
        recipe.variant_alpha(variant),
        recipe.variant_beta(variant),
        recipe.sample_class_guidance(ratios),
    )
