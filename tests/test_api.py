"""The Python API (docs/python_api.md): Synthesizer, DegradedPairs, and the messages issue 19 asked for."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from mdsd3_cli import DegradedPairs, Synthesizer
from mdsd3_cli.cli import app
from mdsd3_cli.dataset.manifest import manifest_files, parse_record
from mdsd3_cli.recipe.generate import RecipeError, load_recipe
from mdsd3_cli.dataset.stored_images import record_image

REPO = Path(__file__).resolve().parent.parent


def _records(dataset: Path) -> list[dict]:
    return [parse_record(line) for path in manifest_files(dataset) for line in path.read_bytes().splitlines(keepends=True)]


def _pixels(dataset: Path, record: dict, role: str) -> np.ndarray:
    return np.asarray(record_image(dataset, record, role).read_rgb())


@pytest.fixture(scope="module")
def synth(folders_dataset: Path) -> Synthesizer:
    """The model and settings of the recipe that made `folders_dataset` (tiny, 32 px, 2 steps, guided)."""
    return Synthesizer.from_recipe(folders_dataset.parent / "recipe.yaml")


def test_degrade_gives_the_bytes_generate_wrote(folders_dataset: Path, synth: Synthesizer) -> None:
    records = _records(folders_dataset)
    assert len(records) == 9  # 3 photos x (rain, mix_r1, mix_r2)
    pairs = synth.degrade([Image.open(record["source"]) for record in records],
                          classes=[record["ratios"] for record in records], seed=[record["seed"] for record in records],
                          alpha=records[0]["alpha"], beta=records[0]["beta"])
    for record, pair in zip(records, pairs):
        assert (record["alpha"], record["beta"]) == (records[0]["alpha"], records[0]["beta"])
        np.testing.assert_array_equal(pair.clean, _pixels(folders_dataset, record, "clean"))
        np.testing.assert_array_equal(pair.degraded, _pixels(folders_dataset, record, "degraded"), err_msg=record["key"])
        assert pair.ratios == record["ratios"] and pair.seed == record["seed"]


def test_arrays_and_pil_images_give_the_same_pairs(synth: Synthesizer) -> None:
    array = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    from_pil, from_array, from_batch = (synth.degrade(images, {"rain": 0.6, "haze": 0.3}, seed=7)
                                        for images in (Image.fromarray(array), array, np.stack([array, array])))
    np.testing.assert_array_equal(from_pil[0].degraded, from_array[0].degraded)
    assert from_pil[0].clean.shape == (32, 32, 3)  # fitted by input.size (centre crop)
    np.testing.assert_array_equal(from_batch[0].degraded, from_array[0].degraded)
    assert [pair.seed for pair in from_batch] == [7, 8]
    assert not np.array_equal(from_batch[0].degraded, from_batch[1].degraded)


@pytest.mark.parametrize(("classes", "message"), [
    ({"rian": 0.5}, "unknown degradation class 'rian'; did you mean 'rain'?"),
    ({"snow": 0.5}, "unknown degradation class 'snow'; known classes: ['rain', 'haze', 'noise']"),
    ({"rain": 1.5}, "ratio for class 'rain' is 1.5; ratios are numbers in [0, 1]"),
    ({"haze": -0.1}, "ratio for class 'haze' is -0.1"),
    ({"rain": math.nan}, "ratio for class 'rain' is nan"),
    ({"rain": True}, "ratio for class 'rain' is True"),
])
def test_bad_class_or_ratio_is_a_clear_value_error(synth: Synthesizer, classes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        synth.degrade(np.zeros((32, 32, 3), np.uint8), classes)


def test_bad_images_are_a_clear_value_error(synth: Synthesizer) -> None:
    with pytest.raises(ValueError, match=re.escape("image 1: arrays must be uint8 [H, W, 3] RGB; got float32")):
        synth.degrade([np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), np.float32)], {"rain": 1.0})
    with pytest.raises(ValueError, match="image 0: too small: 8x8"):
        synth.degrade(np.zeros((8, 8, 3), np.uint8), {"rain": 1.0})


def test_pairs_follow_generate_per_index_and_epoch(folders_dataset: Path, tiny_photos: Path, synth: Synthesizer) -> None:
    """Epoch e of variant v is generate's repeat e + 1 of v: epoch 0 'mix' is mix_r1, epoch 1 is mix_r2."""
    written = {(record["key"], record["folder"]): record for record in _records(folders_dataset)}
    pairs = DegradedPairs(tiny_photos, synth)
    assert len(pairs) == 6  # 3 photos x 2 variants, variant order rain, mix
    for epoch, indexes, folders in ((0, range(6), {"rain": "rain", "mix": "mix_r1"}), (1, [1, 3, 5], {"mix": "mix_r2"})):
        pairs.set_epoch(epoch)
        for index in indexes:
            item = pairs[index]
            record = written[(item["key"], folders[item["variant"]])]
            assert item["seed"] == record["seed"]
            assert item["ratios"].tolist() == [record["ratios"][name] for name in synth.classes]
            expected = _pixels(folders_dataset, record, "degraded")
            np.testing.assert_array_equal((item["degraded"] * 255).round().byte().permute(1, 2, 0).numpy(), expected)
    seeds = {epoch: DegradedPairs(tiny_photos, synth, degrade=False, epoch=epoch)[3]["seed"] for epoch in (1, 2)}
    assert seeds[1] == pairs[3]["seed"] != seeds[2]


def test_degrade_batch_matches_items_degraded_one_by_one(tiny_photos: Path, synth: Synthesizer) -> None:
    lazy, eager = DegradedPairs(tiny_photos, synth, degrade=False), DegradedPairs(tiny_photos, synth)
    assert "degraded" not in lazy[0]
    batch = synth.degrade_batch(next(iter(torch.utils.data.DataLoader(lazy, batch_size=4))))
    assert batch["degraded"].shape == (4, 3, 32, 32) and batch["ratios"].dtype == torch.float64
    for index in range(4):
        assert torch.equal(batch["degraded"][index], eager[index]["degraded"])


def test_cpu_dataloader_workers_degrade_the_same_pairs(tiny_photos: Path, synth: Synthesizer) -> None:
    pairs = DegradedPairs(tiny_photos, synth)
    batch = next(iter(torch.utils.data.DataLoader(pairs, batch_size=2, num_workers=1)))
    assert torch.equal(batch["degraded"][1], pairs[1]["degraded"])


def _tested_doc_block() -> str:
    text = (REPO / "docs" / "python_api.md").read_text()
    marker = "<!-- tests/test_api.py runs the next code block -->"
    match = re.search(re.escape(marker) + r"\n```python\n(.*?)```", text, re.S)
    assert match, f"docs/python_api.md lost its marked example ({marker})"
    return match.group(1)


def test_the_documented_training_loop_runs(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(REPO)
    scope: dict = {}
    exec(compile(_tested_doc_block(), "docs/python_api.md", "exec"), scope)
    assert re.findall(r"epoch (\d): L1 \d+\.\d+", capsys.readouterr().out) == ["0", "1"]
    assert scope["batch"]["degraded"].shape == scope["batch"]["clean"].shape == (3, 3, 32, 32)
    assert math.isfinite(scope["loss"].item())


def _recipe(folder: Path, tiny_photos: Path, **variant_classes: float) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"base": "tiny", "classes": ["rain", "haze", "noise"]}, "input": {"paths": [str(tiny_photos)]},
        "output": {"dir": str(folder / "out")}, "variants": [{"name": "v", "classes": variant_classes}],
    }))
    return path


def test_recipe_unknown_class_suggests_the_closest(tmp_path: Path, tiny_photos: Path) -> None:
    with pytest.raises(RecipeError, match=re.escape("variants.0.classes.rian: unknown degradation class 'rian'; "
                                                    "did you mean 'rain'? known classes: ['rain', 'haze', 'noise']")):
        load_recipe(_recipe(tmp_path, tiny_photos, rian=1.0))


def test_tables_are_not_cut_without_a_terminal(tmp_path: Path, tiny_photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM logs and pipes got "plan for … — shard…" and "/tmp/pytest…" cut to 80 columns."""
    monkeypatch.delenv("COLUMNS", raising=False)
    folder = tmp_path / ("long_folder_name_" * 8)
    folder.mkdir()
    result = CliRunner().invoke(app, ["check", "--config", str(_recipe(folder, tiny_photos, rain=1.0))])
    assert result.exit_code == 0, result.output
    assert str(folder / "out") in result.output


def test_the_readme_python_example_degrades_a_photo_with_mini(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "README.md shows one Python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    pair = scope["pair"]
    assert pair.degraded.shape == pair.clean.shape == (128, 128, 3) and pair.degraded.dtype == np.uint8
    assert np.abs(pair.degraded.astype(int) - pair.clean.astype(int)).mean() > 2  # rain and haze changed it
