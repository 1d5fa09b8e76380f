"""scripts/downstream_check.py: the restorer learns what it is shown, and `--quick` writes the documented table
(every arm, generator and interval present and finite)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "downstream_check.py"
PHOTOS = SCRIPT.parents[1] / "examples" / "photos"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("downstream_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_a_restorer_trained_on_classical_noise_pairs_denoises_held_out_photos(harness, one_torch_thread):
    train = {name: np.asarray(Image.open(PHOTOS / f"{name}.jpg").convert("RGB")) for name in ("astronaut", "rocket")}
    settings = replace(harness.QUICK, pool=8, pool_side=64, crop=32, steps=60, batch=4)
    pool = harness.draw_pool(train, settings)
    pool = harness.Pool(pool.clean, ["noise"] * settings.pool, np.ones(settings.pool))
    noisy = torch.from_numpy(harness.classical_pairs(pool)).permute(0, 3, 1, 2).contiguous()
    clean = torch.from_numpy(pool.clean).permute(0, 3, 1, 2).contiguous()
    held_out = {"chelsea": np.asarray(Image.open(PHOTOS / "chelsea.jpg").convert("RGB"))}
    tiles, _ = harness.held_out_tiles(held_out, 64, 4)
    test = harness.classical_pairs(harness.Pool(tiles, ["noise"] * len(tiles), np.ones(len(tiles))))
    before, _ = harness.quality(tiles, test)

    untrained = harness.train_restorer(clean, noisy, replace(settings, steps=0), seed=0)
    assert np.array_equal(harness.restore(untrained, test), test)  # it starts as the identity
    trained = harness.train_restorer(clean, noisy, settings, seed=0)
    after, _ = harness.quality(tiles, harness.restore(trained, test))
    assert np.all(after > before + 1.0), (before, after)


@pytest.mark.slow
def test_quick_run_writes_every_arm_generator_and_interval(harness, tmp_path, one_torch_thread):
    report = harness.run(harness.QUICK, tmp_path, log=lambda line: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == report["rows"]
    generators = {row["generator"] for row in report["rows"]}
    assert (
        generators
        == {
            "albumentations.RandomRain",
            "albumentations.RandomFog",
            "albumentations.ISONoise",
            "kornia.RandomRain",
            "unprocess low light",
        }
        and report["skipped"] == []
    )
    assert {row["class"] for row in report["rows"]} == {"rain", "haze", "noise", "low_light"}
    for row in report["rows"]:
        assert row["items"] == 3 * report["test_tiles"] and math.isfinite(row["input_psnr"])
        triples = [row["arms"][arm][m] for arm in "ABC" for m in ("dpsnr", "dssim")]
        triples += [row["differences"][pair][m] for pair in ("B-A", "B-C", "C-A") for m in ("dpsnr", "dssim")]
        for mean, low, high in triples:
            assert all(map(math.isfinite, (mean, low, high))) and low - 1e-9 <= mean <= high + 1e-9
    for arm in "ABC":
        for mean, low, high in report["identity"][arm].values():
            assert all(map(math.isfinite, (mean, low, high))) and low - 1e-9 <= mean <= high + 1e-9
    assert all(value["scale"] > 0 and math.isfinite(value["scale"]) for value in report["scales"].values())
    table = (tmp_path / "table.md").read_text()
    header = "| class | generator | input | A classical | B mini | C classical at mini's strengths | B − A | B − C |"
    assert table.count(header) == 2  # ΔPSNR and ΔSSIM
    for row in report["rows"]:
        assert table.count(f"| {row['class']} | {row['generator']} |") == 2
    assert len([line for line in table.splitlines() if line.startswith("| A classical |")]) == 1
