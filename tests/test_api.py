"""The Python API (docs/python_api.md): Synthesizer, DegradedPairs, the messages issues 19 and 27 asked for, and the
conventions and runnable examples of issue 30."""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdsd3_cli import DegradedPairs, Synthesizer
from mdsd3_cli.dataset.manifest import parse_record
from mdsd3_cli.dataset.reader import manifest_files
from mdsd3_cli.dataset.stored_images import record_image
from mdsd3_cli.recipe.generate import RecipeError, load_recipe

from .helpers import REPO, generate_recipe, mdsd3


def _records(dataset: Path) -> list[dict]:
    return [
        parse_record(line) for path in manifest_files(dataset) for line in path.read_bytes().splitlines(keepends=True)
    ]


def _pixels(dataset: Path, record: dict, role: str) -> np.ndarray:
    return np.asarray(record_image(dataset, record, role).read_rgb())


@pytest.fixture(scope="module")
def synth(folders_dataset: Path) -> Synthesizer:
    """The model and settings of the recipe that made `folders_dataset` (tiny, 32 px, 2 steps, guided)."""
    return Synthesizer.from_recipe(folders_dataset.parent / "recipe.yaml")


@pytest.fixture(scope="module")
def quick() -> Synthesizer:
    """The cheapest model for what does not depend on the settings: tiny, 32 px, 1 step, no guidance."""
    return Synthesizer.from_preset("tiny", overrides=["input.size=32", "sampling.steps=1"])


def test_degrade_gives_the_bytes_generate_wrote(folders_dataset: Path, synth: Synthesizer) -> None:
    records = _records(folders_dataset)
    assert len(records) == 9  # 3 photos x (rain, mix_r1, mix_r2)
    pairs = synth.degrade(
        [Image.open(record["source"]) for record in records],
        classes=[record["ratios"] for record in records],
        seed=[record["seed"] for record in records],
        alpha=records[0]["alpha"],
        beta=records[0]["beta"],
    )
    for record, pair in zip(records, pairs):
        assert (record["alpha"], record["beta"]) == (records[0]["alpha"], records[0]["beta"])
        np.testing.assert_array_equal(pair.clean, _pixels(folders_dataset, record, "clean"))
        np.testing.assert_array_equal(
            pair.degraded, _pixels(folders_dataset, record, "degraded"), err_msg=record["key"]
        )
        assert pair.ratios == record["ratios"] and pair.seed == record["seed"]


def test_arrays_and_pil_images_give_the_same_pairs(synth: Synthesizer) -> None:
    array = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    from_pil, from_array, from_batch = (
        synth.degrade(images, {"rain": 0.6, "haze": 0.3}, seed=7)
        for images in (Image.fromarray(array), array, np.stack([array, array]))
    )
    np.testing.assert_array_equal(from_pil[0].degraded, from_array[0].degraded)
    assert from_pil[0].clean.shape == (32, 32, 3)  # fitted by input.size (centre crop)
    np.testing.assert_array_equal(from_batch[0].degraded, from_array[0].degraded)
    assert [pair.seed for pair in from_batch] == [7, 8]
    assert not np.array_equal(from_batch[0].degraded, from_batch[1].degraded)


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ({"rian": 0.5}, "unknown degradation class 'rian'; did you mean 'rain'?"),
        ({"snow": 0.5}, "unknown degradation class 'snow'; known classes: ['rain', 'haze', 'noise']"),
        ({"rain": 1.5}, "ratio for class 'rain' is 1.5; ratios are numbers in [0, 1]"),
        ({"haze": -0.1}, "ratio for class 'haze' is -0.1"),
        ({"rain": math.nan}, "ratio for class 'rain' is nan"),
        ({"rain": True}, "ratio for class 'rain' is True"),
    ],
)
def test_bad_class_or_ratio_is_a_clear_value_error(synth: Synthesizer, classes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        synth.degrade(np.zeros((32, 32, 3), np.uint8), classes)


def test_arrays_tensors_and_paths_give_the_same_pairs(tmp_path: Path, quick: Synthesizer) -> None:
    """Issue 30: float arrays (taken as [0, 1]), [3, H, W] and [B, 3, H, W] tensors and paths are images too."""
    array = (np.random.default_rng(1).random((40, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(array).save(tmp_path / "photo.png")
    chw = torch.from_numpy(array).permute(2, 0, 1)
    inputs = {
        "float32 array": array.astype(np.float32) / 255,
        "uint8 tensor": chw,
        "float tensor batch": torch.stack([chw, chw]).float() / 255,
        "path": str(tmp_path / "photo.png"),
    }
    expected = quick.degrade(array, {"rain": 0.6, "haze": 0.3}, seed=7)[0]
    for name, images in inputs.items():
        pairs = quick.degrade(images, {"rain": 0.6, "haze": 0.3}, seed=7)
        assert len(pairs) == (2 if name == "float tensor batch" else 1)
        np.testing.assert_array_equal(pairs[0].clean, expected.clean, err_msg=name)
        np.testing.assert_array_equal(pairs[0].degraded, expected.degraded, err_msg=name)


def test_output_type_gives_tensors_like_degraded_pairs_or_pil_images(quick: Synthesizer) -> None:
    array = (np.random.default_rng(2).random((32, 32, 3)) * 255).astype(np.uint8)
    arrays, tensors, images = (
        quick.degrade(array, {"noise": 0.5}, seed=3, output_type=kind)[0] for kind in ("np", "pt", "pil")
    )
    assert tensors.degraded.dtype == torch.float32 and tensors.degraded.shape == (3, 32, 32)
    assert torch.equal(tensors.degraded, torch.from_numpy(arrays.degraded).permute(2, 0, 1).float() / 255)
    assert torch.equal(tensors.clean, torch.from_numpy(arrays.clean).permute(2, 0, 1).float() / 255)
    assert images.degraded.mode == "RGB" and np.array_equal(np.asarray(images.degraded), arrays.degraded)
    with pytest.raises(ValueError, match=re.escape("output_type must be one of 'np', 'pt', 'pil'; got 'numpy'")):
        quick.degrade(array, {"noise": 0.5}, output_type="numpy")


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        (
            [np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32, 3), bool)],
            TypeError,
            "images[1]: pixels of dtype bool are not taken; use uint8 (0-255) or float (0-1)",
        ),
        (np.zeros((32, 32, 3), np.int32), TypeError, "images[0]: pixels of dtype int32 are not taken"),
        (torch.zeros((3, 32, 32), dtype=torch.bool), TypeError, "images[0]: pixels of dtype bool are not taken"),
        (
            np.full((32, 32, 3), 255.0, np.float32),
            ValueError,
            "images[0]: float pixels are taken as [0, 1]; found values 255 to 255",
        ),
        (
            np.full((32, 32, 3), np.nan),
            ValueError,
            "images[0]: float pixels are taken as [0, 1]; found 3072 NaN or infinite",
        ),
        (
            np.zeros((32, 32), np.uint8),
            ValueError,
            "images[0]: arrays are [H, W, 3] RGB (a batch [B, H, W, 3]); got shape [32, 32]",
        ),
        (
            torch.zeros((32, 32, 3)),
            ValueError,
            "images[0]: tensors are [3, H, W] RGB (a batch [B, 3, H, W]); got shape [32, 32, 3]",
        ),
        (np.zeros((8, 8, 3), np.uint8), ValueError, "images[0]: too small: 8x8"),
        ("no/such/photo.png", ValueError, "images[0] (no/such/photo.png): cannot read file"),
        ([np.zeros((32, 32, 3), np.uint8), 5], TypeError, "images[1]: expected a PIL image, an [H, W, 3] array"),
        (5, TypeError, "images must be a PIL image, an [H, W, 3] array, a [3, H, W] tensor or an image file's path"),
    ],
)
def test_bad_images_name_the_argument(synth: Synthesizer, images: object, error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        synth.degrade(images, {"rain": 1.0})


@pytest.mark.parametrize(
    ("start", "error", "message"),
    [
        ({"alpha": math.nan}, ValueError, "alpha is nan: input should be a finite number"),
        ({"alpha": math.inf}, ValueError, "alpha is inf: input should be a finite number"),
        ({"alpha": 1e30}, ValueError, "alpha is 1e+30: input should be less than or equal to 10"),
        ({"alpha": 0}, ValueError, "alpha is 0.0: input should be greater than 0"),
        ({"alpha": -1}, ValueError, "alpha is -1.0: input should be greater than 0"),
        ({"beta": -0.1}, ValueError, "beta is -0.1: input should be greater than or equal to 0"),
        ({"beta": math.inf}, ValueError, "beta is inf: input should be a finite number"),
        ({"beta": 11}, ValueError, "beta is 11.0: input should be less than or equal to 10"),
        ({"alpha": True}, TypeError, "alpha must be a number; got bool True"),
        ({"beta": "1"}, TypeError, "beta must be a number; got str '1'"),
    ],
)
def test_alpha_and_beta_are_held_to_the_recipe_rules(
    synth: Synthesizer, start: dict, error: type, message: str
) -> None:
    """Issue 27: these gave black images as a success."""
    with pytest.raises(error, match=re.escape(message)):
        synth.degrade(np.zeros((32, 32, 3), np.uint8), {"rain": 1.0}, **start)


def test_numpy_numbers_are_taken_as_alpha_beta_and_ratios(quick: Synthesizer) -> None:
    array = (np.random.default_rng(3).random((32, 32, 3)) * 255).astype(np.uint8)
    plain = quick.degrade(array, {"rain": 0.5, "haze": 0.25}, seed=1, alpha=0.75, beta=0.5)[0]
    numpy = quick.degrade(
        array, {"rain": np.float32(0.5), "haze": np.float64(0.25)}, seed=1, alpha=np.float32(0.75), beta=np.float16(0.5)
    )[0]
    np.testing.assert_array_equal(plain.degraded, numpy.degraded)
    assert numpy.ratios == plain.ratios and all(type(value) is float for value in numpy.ratios.values())


def test_the_recipe_refuses_alpha_and_beta_above_ten(tmp_path: Path, tiny_photos: Path) -> None:
    with pytest.raises(
        RecipeError,
        match=re.escape("sampling.alpha (from --set sampling.alpha=1000): Input should be less than or equal to 10"),
    ):
        load_recipe(generate_recipe(tmp_path / "recipe.yaml", tiny_photos, tmp_path / "out"), ["sampling.alpha=1000"])
    with pytest.raises(RecipeError, match=re.escape("variants.0.beta (from --set variants.0.beta=10.5)")):
        load_recipe(generate_recipe(tmp_path / "recipe.yaml", tiny_photos, tmp_path / "out"), ["variants.0.beta=10.5"])
    assert load_recipe(
        generate_recipe(tmp_path / "recipe.yaml", tiny_photos, tmp_path / "out"),
        ["sampling.alpha=10", "sampling.beta=10"],
    )


@pytest.mark.parametrize(
    ("seed", "count", "error", "message"),
    [
        (2**64, 1, ValueError, "seed is 18446744073709551616; seeds are integers in [0, 2**64)"),
        (-1, 1, ValueError, "seed is -1; seeds are integers in [0, 2**64)"),
        (2**64 - 1, 2, ValueError, "seed + 1 (the seed of images[1]) is 18446744073709551616"),
        ([5, -2], 2, ValueError, "seed[1] is -2"),
        ([np.uint64(2**64 - 1), 2**64], 2, ValueError, "seed[1] is 18446744073709551616"),
        ("7", 1, TypeError, "seed must be an integer in [0, 2**64) or one per image; got str '7'"),
        ("12", 2, TypeError, "seed must be an integer in [0, 2**64) or one per image; got str '12'"),
        (7.0, 1, TypeError, "seed must be an integer in [0, 2**64) or one per image; got float 7.0"),
        (True, 1, TypeError, "got bool True"),
        ([7, "8"], 2, TypeError, "seed[1] must be an integer in [0, 2**64); got str '8'"),
        ([7], 2, ValueError, "2 images need 2 seeds; got 1"),
    ],
)
def test_seeds_are_integers_below_2_to_the_64(
    synth: Synthesizer, seed: object, count: int, error: type, message: str
) -> None:
    """Issue 27: np.int64 and >= 2**64 failed oddly, -1 was 2**64 - 1, '7' was taken and '12' not."""
    with pytest.raises(error, match=re.escape(message)):
        synth.degrade([np.zeros((32, 32, 3), np.uint8)] * count, {"rain": 1.0}, seed=seed)


def test_numpy_and_tensor_seeds_are_their_integers(quick: Synthesizer) -> None:
    array = (np.random.default_rng(4).random((32, 32, 3)) * 255).astype(np.uint8)
    reference = quick.degrade(array, {"haze": 1.0}, seed=7)[0]
    pair = quick.degrade(array, {"haze": 1.0}, seed=np.int64(7))[0]
    np.testing.assert_array_equal(pair.degraded, reference.degraded)
    assert pair.seed == 7 and type(pair.seed) is int
    pairs = quick.degrade([array, array], {}, seed=[np.int32(7), np.uint64(2**64 - 1)])
    assert [(pair.seed, type(pair.seed)) for pair in pairs] == [(7, int), (2**64 - 1, int)]
    for seeds in (np.array([7]), torch.tensor([7])):
        assert [(pair.seed, type(pair.seed)) for pair in quick.degrade(array, {}, seed=seeds)] == [(7, int)]


def test_classes_must_be_a_mapping_or_one_per_image(synth: Synthesizer) -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(
        TypeError,
        match=re.escape(
            "classes must be a mapping of class name to ratio, or a list of them (one per image); got str 'rain'"
        ),
    ):
        synth.degrade(image, "rain")
    with pytest.raises(TypeError, match=re.escape("classes[1] must be a mapping of class name to ratio; got str")):
        synth.degrade([image, image], [{"rain": 1.0}, "haze"])
    with pytest.raises(ValueError, match=re.escape("2 images need 2 class mappings; got 1")):
        synth.degrade([image, image], [{"rain": 1.0}])


def test_reprs_are_short_and_readable(tiny_photos: Path, synth: Synthesizer) -> None:
    pair = synth.degrade(np.zeros((32, 32, 3), np.uint8), {"rain": 0.5}, seed=7)[0]
    assert repr(pair) == (
        "Pair(clean=uint8[32, 32, 3], degraded=uint8[32, 32, 3], ratios={'rain': 0.5, 'haze': 0, 'noise': 0}, seed=7)"
    )
    tensors = synth.degrade(np.zeros((32, 32, 3), np.uint8), {"rain": 0.5}, output_type="pt")[0]
    assert repr(tensors).startswith("Pair(clean=torch.float32[3, 32, 32], degraded=torch.float32[3, 32, 32]")
    assert repr(synth).startswith(
        "Synthesizer(base='tiny', adapter=None, classes=['rain', 'haze', 'noise'], "
        "device='cpu', dtype='float32', size=32, resize='center_crop', steps=2, guidance=2"
    )
    assert repr(DegradedPairs(tiny_photos, synth, degrade=False)) == (
        "DegradedPairs(3 photos x 2 variants ['rain', 'mix'] = 6 items, epoch=0, degrade=False, failed=0)"
    )


def test_device_and_dtype_keywords(folders_dataset: Path) -> None:
    """Issue 30: from_preset("mini", device="cpu") was a TypeError."""
    tiny = Synthesizer.from_preset("tiny", overrides=["input.size=32"], device=torch.device("cpu"), dtype=torch.float32)
    assert (tiny.device, tiny.dtype, tiny.recipe.model.device, tiny.recipe.model.dtype) == (
        torch.device("cpu"),
        torch.float32,
        "cpu",
        "float32",
    )
    recipe = Synthesizer.from_recipe(folders_dataset.parent / "recipe.yaml", device="cpu", dtype="float32")
    assert (recipe.recipe.model.device, recipe.dtype) == ("cpu", torch.float32)
    with pytest.raises(ValueError, match=re.escape("device='tpu': String should match pattern")):
        Synthesizer.from_preset("tiny", device="tpu")
    with pytest.raises(
        ValueError, match=re.escape("dtype='float64': Input should be 'auto', 'float32', 'bfloat16' or 'float16'")
    ):
        Synthesizer.from_folder("unused", classes=["rain"], dtype=torch.float64)
    with pytest.raises(TypeError, match=re.escape("dtype must be a string or a torch.dtype; got int 3")):
        Synthesizer.from_preset("tiny", dtype=3)


def test_pairs_follow_generate_per_index_and_epoch(
    folders_dataset: Path, tiny_photos: Path, synth: Synthesizer
) -> None:
    """Epoch e of variant v is generate's repeat e + 1 of v: epoch 0 'mix' is mix_r1, epoch 1 is mix_r2."""
    written = {(record["key"], record["folder"]): record for record in _records(folders_dataset)}
    pairs = DegradedPairs(tiny_photos, synth)
    assert len(pairs) == 6  # 3 photos x 2 variants, variant order rain, mix
    for epoch, indexes, folders in (
        (0, range(6), {"rain": "rain", "mix": "mix_r1"}),
        (1, [1, 3, 5], {"mix": "mix_r2"}),
    ):
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


def test_degrade_batch_checks_what_the_batch_asks_for(tiny_photos: Path, quick: Synthesizer) -> None:
    batch = torch.utils.data.default_collate([DegradedPairs(tiny_photos, quick, degrade=False)[0]])
    for key, value, message in (
        ("alpha", torch.tensor([math.nan], dtype=torch.float64), "alpha is nan"),
        ("seed", torch.tensor([-1]), "batch['seed'][0] is -1"),
        ("ratios", torch.tensor([[1.5, 0.0, 0.0]], dtype=torch.float64), "ratio for class 'rain' is 1.5"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            quick.degrade_batch({**batch, key: value})


def test_cpu_dataloader_workers_degrade_the_same_pairs(tiny_photos: Path, synth: Synthesizer) -> None:
    pairs = DegradedPairs(tiny_photos, synth)
    batch = next(iter(torch.utils.data.DataLoader(pairs, batch_size=2, num_workers=1)))
    assert torch.equal(batch["degraded"][1], pairs[1]["degraded"])


def test_recipe_unknown_class_suggests_the_closest(tmp_path: Path, tiny_photos: Path) -> None:
    with pytest.raises(
        RecipeError,
        match=re.escape(
            "variants.0.classes.rian: unknown degradation class 'rian'; "
            "did you mean 'rain'? known classes: ['rain', 'haze', 'noise']"
        ),
    ):
        load_recipe(
            generate_recipe(tmp_path / "r.yaml", tiny_photos, tmp_path / "out", "variants.rain.classes={rian: 1.0}")
        )


def test_tables_are_not_cut_without_a_terminal(
    tmp_path: Path, tiny_photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLURM logs and pipes got "plan for … — shard…" and "/tmp/pytest…" cut to 80 columns."""
    monkeypatch.delenv("COLUMNS", raising=False)
    folder = tmp_path / ("long_folder_name_" * 8)
    folder.mkdir()
    result = mdsd3("check", "--config", generate_recipe(folder / "recipe.yaml", tiny_photos, folder / "out"))
    assert result.exit_code == 0, result.output
    assert str(folder / "out") in result.output


DOCUMENTED = ("README.md", "docs/python_api.md")


def _examples(name: str) -> list[tuple[int, str, str | None]]:
    """The ```python blocks of a document: (line of the code, code, the ```text block right after it or None)."""
    text = (REPO / name).read_text()
    pattern = r"^```python\n(.*?)^```\n(?:\n?```text\n(.*?)^```\n)?"
    return [
        (text.count("\n", 0, match.start()) + 2, match.group(1), match.group(2))
        for match in re.finditer(pattern, text, re.S | re.M)
    ]


@functools.cache
def _run_example(name: str, index: int) -> tuple[dict, str]:
    """Run one example from the repository root, as a reader would; its variables and what it printed."""
    line, code, _ = _examples(name)[index]
    scope: dict = {"__name__": "__main__"}
    with contextlib.chdir(REPO), contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile("\n" * (line - 1) + code, str(REPO / name), "exec"), scope)
    return scope, printed.getvalue()


@pytest.mark.parametrize(
    ("name", "index"),
    [(name, index) for name in DOCUMENTED for index in range(len(_examples(name)))],
    ids=[f"{name}:{line}" for name in DOCUMENTED for line, _, _ in _examples(name)],
)
def test_the_python_examples_in_the_docs_run(name: str, index: int) -> None:
    """Issue 30: every ```python block of README.md and docs/python_api.md runs, and prints the ```text block
    shown after it, when there is one."""
    _, printed = _run_example(name, index)
    expected = _examples(name)[index][2]
    if expected is not None:
        assert printed == expected


def test_the_docs_have_python_examples() -> None:
    assert [len(_examples(name)) >= 1 for name in DOCUMENTED] == [True, True]


def test_the_readme_python_example_degrades_a_photo_with_mini() -> None:
    pair = _run_example("README.md", 0)[0]["pair"]
    assert pair.degraded.shape == pair.clean.shape == (128, 128, 3) and pair.degraded.dtype == np.uint8
    assert np.abs(pair.degraded.astype(int) - pair.clean.astype(int)).mean() > 2  # rain and haze changed it


def test_the_documented_training_loop_runs() -> None:
    index = next(index for index, (_, code, _) in enumerate(_examples("docs/python_api.md")) if "DataLoader" in code)
    scope, printed = _run_example("docs/python_api.md", index)
    assert re.findall(r"epoch (\d): L1 \d+\.\d+", printed) == ["0", "1"]
    assert scope["batch"]["degraded"].shape == scope["batch"]["clean"].shape == (3, 3, 32, 32)
    assert math.isfinite(scope["loss"].item())


def test_single_class_pairs_are_generates_single_class_variant(
    folders_dataset: Path, tiny_photos: Path, synth: Synthesizer
) -> None:
    """Issue 30: mode="single" gives one variant per class, named after it: the recipe's `rain` variant here."""
    written = {record["key"]: record for record in _records(folders_dataset) if record["folder"] == "rain"}
    pairs = DegradedPairs(tiny_photos, synth, degrade=False, classes={"rain": 1.0}, mode="single")
    assert len(pairs) == 3 and [variant.name for variant in pairs.variants] == ["rain"]
    for index in range(3):
        item = pairs[index]
        record = written[item["key"]]
        assert item["variant"] == "rain" and item["seed"] == record["seed"]
        assert item["ratios"].tolist() == [record["ratios"][name] for name in synth.classes] == [1.0, 0.0, 0.0]
    degraded = synth.degrade_batch(torch.utils.data.default_collate([pairs[0]]))["degraded"][0]
    np.testing.assert_array_equal(
        (degraded * 255).round().byte().permute(1, 2, 0).numpy(),
        _pixels(folders_dataset, written[pairs[0]["key"]], "degraded"),
    )


def test_classes_and_mode_choose_the_variants(tiny_photos: Path, quick: Synthesizer) -> None:
    single = DegradedPairs(tiny_photos, quick, degrade=False, mode="single")
    assert [variant.name for variant in single.variants] == quick.classes and len(single) == 9
    for index in range(len(single)):
        item = single[index]
        chosen = quick.classes.index(item["variant"])
        assert [value for at, value in enumerate(item["ratios"].tolist()) if at != chosen] == [0.0, 0.0]
        assert 0.0 <= item["ratios"][chosen] <= 1.0
    mixed = DegradedPairs(tiny_photos, quick, degrade=False, classes=["rain", "haze"])
    assert [variant.name for variant in mixed.variants] == ["mix"]
    assert all(mixed[index]["ratios"][2] == 0.0 for index in range(3))
    every = DegradedPairs(tiny_photos, quick, degrade=False, mode="mix")
    preset = DegradedPairs(tiny_photos, quick, degrade=False)  # the preset's one variant draws every class
    for index in range(3):
        assert every[index]["seed"] == preset[index]["seed"]
        assert torch.equal(every[index]["ratios"], preset[index]["ratios"])


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"classes": {"rian": 1.0}}, ValueError, "classes: unknown degradation class 'rian'; did you mean 'rain'?"),
        ({"classes": {"rain": 1.5}}, ValueError, "classes: rain: ratio 1.5 is outside [0, 1]"),
        (
            {"classes": {"haze": [0.8, 0.2]}, "mode": "single"},
            ValueError,
            "classes: haze: ratio range [0.8, 0.2] has lo > hi",
        ),
        ({"classes": []}, ValueError, "classes names no class"),
        (
            {"classes": "rain"},
            TypeError,
            "classes must be a list of class names or a mapping of class name to ratio; got str",
        ),
        ({"mode": "both"}, ValueError, "mode must be 'mix' or 'single'; got 'both'"),
    ],
)
def test_bad_classes_or_mode_name_the_argument(
    tiny_photos: Path, quick: Synthesizer, options: dict, error: type, message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        DegradedPairs(tiny_photos, quick, **options)


def test_an_undecodable_photo_is_skipped_and_recorded(tmp_path: Path, tiny_photos: Path, quick: Synthesizer) -> None:
    """Issue 27: one bad photo aborted the epoch; generate skips and records it, and so does DegradedPairs."""
    photos = shutil.copytree(tiny_photos, tmp_path / "photos")
    (photos / "broken.png").write_bytes(b"not a png")
    pairs = DegradedPairs(photos, quick, degrade=False, classes=["rain"])
    loader = torch.utils.data.DataLoader(pairs, batch_size=2)
    with pytest.warns(UserWarning, match=r"DegradedPairs skips .*broken\.png: not an image .*\(1 of 4 photos skipped"):
        keys = [key for batch in loader for key in batch["key"]]
    assert keys == ["astronaut", "coffee", "coffee", "sub/chelsea.v2 x"]  # broken's item is made from the next photo
    assert [(failure.key, Path(failure.path).name) for failure in pairs.failed] == [("broken", "broken.png")]
    assert "not an image" in pairs.failed[0].reason and repr(pairs).endswith("failed=1)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recorded once: the next epoch neither warns nor records it again
        pairs.set_epoch(1)
        assert [key for batch in loader for key in batch["key"]] == keys and len(pairs.failed) == 1


def test_photos_discovery_drops_are_recorded_too(tmp_path: Path, quick: Synthesizer) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("sky.png", "sky.jpg", "sea.png"):
        Image.new("RGB", (32, 32), (10, 20, 30)).save(photos / name)
    pairs = DegradedPairs(photos, quick, degrade=False)
    assert len(pairs) == 1 and pairs[0]["key"] == "sea"
    assert sorted(Path(failure.path).name for failure in pairs.failed) == ["sky.jpg", "sky.png"]
    assert all("duplicate key" in failure.reason for failure in pairs.failed)


def test_no_decodable_photo_is_a_clear_error(tmp_path: Path, quick: Synthesizer) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        (photos / name).write_bytes(b"")
    pairs = DegradedPairs(photos, quick, degrade=False)
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match=r"none of the 2 photos decodes \(.*a\.png: empty file"),
    ):
        pairs[0]
