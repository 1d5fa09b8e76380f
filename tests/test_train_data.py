"""Training recipe and training data: discovery, loading, augmentation, deterministic sampling."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from mdsd3_cli.recipe.train import TrainRecipeError, load_train_recipe
from mdsd3_cli.train.data import (
    BAD_RECORD,
    MISSING_FILE,
    SIZE_MISMATCH,
    UNKNOWN_CLASS,
    UNMATCHED,
    UNREADABLE,
    DatasetError,
    Draw,
    EmptyDatasetError,
    batch_prompts,
    build_dataset,
    condition_drop_mask,
)

from .helpers import count_decodes, write_recipe, yaml_text

RESOLUTION = 32


def photo(name: str = "astronaut", size: tuple[int, int] = (72, 48)) -> Image.Image:
    """A real photograph from scikit-image, shrunk to `size` (width, height) so tests stay fast."""
    return Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size, Image.Resampling.BICUBIC)


def save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def inverted(image: Image.Image) -> Image.Image:
    return Image.fromarray(255 - np.asarray(image))


TRAIN_RECIPE = {"classes": ["haze", "noise"], "datasets": [], "data": {"resolution": RESOLUTION, "workers": 0}}


def write_train_recipe(folder: Path, datasets: list[dict], **data: object) -> Path:
    overrides = [f"datasets={yaml_text(datasets)}"] + [
        f"data.{field}={yaml_text(value)}" for field, value in data.items()
    ]
    return write_recipe(folder / "train.yaml", *overrides, base=TRAIN_RECIPE)


def dataset_from(folder: Path, datasets: list[dict], **data: object):
    return build_dataset(load_train_recipe(write_train_recipe(folder, datasets, **data)))


def folders_dataset(tmp_path: Path, pairs: dict[str, tuple[Image.Image, Image.Image]], **spec: object) -> dict:
    for key, (clean, degraded) in pairs.items():
        save(clean, tmp_path / "clean" / f"{key}.png")
        save(degraded, tmp_path / "degraded" / f"{key}.png")
    return {
        "name": "pairs",
        "kind": "paired_folders",
        "clean": "clean",
        "degraded": "degraded",
        "classes": {"haze": 1.0},
        **spec,
    }


# ---------------------------------------------------------------- recipe


def test_recipe_resolves_relative_paths_and_applies_overrides(tmp_path: Path) -> None:
    spec = folders_dataset(tmp_path, {"a": (photo(), photo())})
    path = write_train_recipe(tmp_path, [spec])
    recipe = load_train_recipe(path, ["datasets.pairs.weight=2.5", "data.resolution=64", "train.lr=3e-5"])
    assert recipe.datasets[0].clean == tmp_path / "clean"
    assert recipe.output.dir == tmp_path / "runs" / "mdsd3"
    assert (recipe.datasets[0].weight, recipe.data.resolution, recipe.train.lr) == (2.5, 64, 3e-5)


def test_recipe_errors_name_file_and_dotted_field(tmp_path: Path) -> None:
    spec = folders_dataset(tmp_path, {"a": (photo(), photo())})
    bad = [
        {**spec, "classes": {"rain": 1.0}, "weight": 0},
        {**spec, "degraded": "nowhere", "match": "(?P<id>\\d+)"},
        {"name": "pairs", "kind": "pair_list", "list": "pairs.txt"},
    ]
    path = write_train_recipe(tmp_path, bad, resolution=500, identity_fraction=1.0, speed=3)
    with pytest.raises(TrainRecipeError) as caught:
        load_train_recipe(path)
    lines = str(caught.value).splitlines()
    for field in (
        "datasets.0.weight",
        "datasets.1.degraded",
        "datasets.1.match",
        "datasets.2.list",
        "data.resolution",
        "data.identity_fraction",
        "data.speed",
    ):
        assert any(line.startswith(f"{path}: {field}: ") for line in lines), (field, lines)

    with pytest.raises(TrainRecipeError, match=r"datasets\.0\.classes\.rain: unknown class"):
        load_train_recipe(write_train_recipe(tmp_path, [{**spec, "classes": {"haze": 1.0, "rain": 1.0}}]))
    with pytest.raises(TrainRecipeError, match=r"datasets\.1\.name: 'pairs' is also the name of datasets\.0"):
        load_train_recipe(write_train_recipe(tmp_path, [spec, spec]))
    with pytest.raises(TrainRecipeError, match=r"--set 'datasets\.7\.weight=1': .*neither an index nor a name"):
        load_train_recipe(path, ["datasets.7.weight=1"])


# ---------------------------------------------------------------- discovery


def test_regex_pairs_reside_style_names(tmp_path: Path) -> None:
    save(photo("astronaut"), tmp_path / "clear" / "0001.png")
    save(photo("coffee"), tmp_path / "clear" / "0002.jpg")
    for name in ("0001_0.8_0.2.png", "0001_0.9_0.16.jpg", "0002_0.7_0.1.png", "9999_0.8_0.2.png", "notes.png"):
        save(photo("chelsea"), tmp_path / "hazy" / name)
    spec = {
        "name": "reside",
        "kind": "paired_folders",
        "clean": "clear",
        "degraded": "hazy",
        "match": r"^(?P<stem>\d+)_.*$",
        "classes": {"haze": 1.0},
    }
    dataset = dataset_from(tmp_path, [spec])

    pairs = {(pair.degraded.path.name, pair.clean.path.name) for pair in dataset.pairs}
    assert pairs == {
        ("0001_0.8_0.2.png", "0001.png"),
        ("0001_0.9_0.16.jpg", "0001.png"),
        ("0002_0.7_0.1.png", "0002.jpg"),
    }
    assert dataset.report.counts() == {UNMATCHED: 2}
    assert "reside: 3 pairs" in dataset.summary() and "unmatched: 2" in dataset.summary()


def test_folders_pair_by_relative_path_with_other_extension(tmp_path: Path) -> None:
    save(photo("astronaut"), tmp_path / "gt" / "city" / "a.png")
    save(photo("coffee"), tmp_path / "gt" / "b.png")
    save(photo("astronaut"), tmp_path / "lq" / "city" / "a.jpg")
    save(photo("coffee"), tmp_path / "lq" / "b.png")
    save(photo("coffee"), tmp_path / "lq" / "other" / "b.png")
    spec = {"name": "n", "kind": "paired_folders", "clean": "gt", "degraded": "lq", "classes": {"noise": 0.5}}
    dataset = dataset_from(tmp_path, [spec])
    assert sorted(
        (p.clean.path.relative_to(tmp_path).as_posix(), p.degraded.path.relative_to(tmp_path).as_posix())
        for p in dataset.pairs
    ) == [("gt/b.png", "lq/b.png"), ("gt/city/a.png", "lq/city/a.jpg")]
    assert dataset.report.counts() == {UNMATCHED: 1}
    assert dataset.pairs[0].ratios == {"noise": 0.5}


def test_csv_and_jsonl_pair_lists(tmp_path: Path) -> None:
    for index, name in enumerate(("astronaut", "coffee", "chelsea")):
        save(photo(name), tmp_path / "lists" / "gt" / f"{index}.png")
        save(photo(name), tmp_path / "lists" / "noisy" / f"{index}.png")
    (tmp_path / "lists" / "pairs.csv").write_text(
        "clean,degraded,classes\ngt/0.png,noisy/0.png,\ngt/1.png,noisy/1.png,haze noise:0.5\ngt/9.png,noisy/9.png,\n"
    )
    rows = [
        {"clean": "gt/0.png", "degraded": "noisy/0.png", "classes": {"haze": 0.25}},
        {"clean": str(tmp_path / "lists" / "gt" / "2.png"), "degraded": "noisy/2.png", "classes": ["noise"]},
    ]
    (tmp_path / "lists" / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    datasets = [
        {"name": "sidd", "kind": "pair_list", "list": "lists/pairs.csv", "classes": {"noise": 1.0}},
        {"name": "mixed", "kind": "pair_list", "list": "lists/pairs.jsonl"},
    ]
    dataset = dataset_from(tmp_path, datasets)

    got = [(p.dataset, p.clean.path.name, p.degraded.path.parent.name, dict(p.ratios)) for p in dataset.pairs]
    assert got == [
        ("sidd", "0.png", "noisy", {"noise": 1.0}),
        ("sidd", "1.png", "noisy", {"haze": 1.0, "noise": 0.5}),
        ("mixed", "0.png", "noisy", {"haze": 0.25}),
        ("mixed", "2.png", "noisy", {"noise": 1.0}),
    ]
    assert dataset.report.counts() == {MISSING_FILE: 1}
    assert "pairs.csv:4" in dataset.report.examples(MISSING_FILE)[0]

    (tmp_path / "lists" / "pairs.jsonl").write_text(json.dumps({**rows[0], "classes": {"snow": 1}}) + "\n")
    with pytest.raises(DatasetError, match=r"pairs\.jsonl:1: classes: unknown degradation class 'snow'"):
        dataset_from(tmp_path, datasets)


def test_mdsd3_output_manifest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    records = []
    for key, name in (("a", "astronaut"), ("b", "coffee"), ("c", "chelsea")):
        save(photo(name), out / "clean" / f"{key}.png")
        save(inverted(photo(name)), out / "degraded" / "haze_noise" / f"{key}.png")
        records.append(
            {
                "key": key,
                "folder": "haze_noise",
                "clean": f"clean/{key}.png",
                "degraded": f"degraded/haze_noise/{key}.png",
                "variant": "haze_noise",
                "ratios": {"haze": 1.0, "noise": 0.4},
            }
        )
    records[1]["ratios"] = {"rain": 1.0, "haze": 0.5}
    records[2]["ratios"] = {"rain": 0.0, "noise": 0.7}
    lines = [json.dumps(record) for record in records]
    (out / "manifest").mkdir()
    (out / "manifest" / "shard0.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:20])
    dataset = dataset_from(tmp_path, [{"name": "synth", "kind": "mdsd3_output", "dir": "out"}])

    assert [
        (p.clean.path.name, p.degraded.path.relative_to(out).as_posix(), dict(p.ratios)) for p in dataset.pairs
    ] == [
        ("a.png", "degraded/haze_noise/a.png", {"haze": 1.0, "noise": 0.4}),
        ("c.png", "degraded/haze_noise/c.png", {"noise": 0.7}),
    ]
    assert dataset.report.counts() == {UNKNOWN_CLASS: 1, BAD_RECORD: 1}
    rows = {tuple(round(value, 4) for value in row) for row in dataset.sample_batch(0, 16)["ratios"].tolist()}
    assert rows <= {(1.0, 0.4), (0.0, 0.7), (0.0, 0.0)} and len(rows) >= 2


def test_mdsd3_output_in_webdataset_layout_reads_the_tar_members(tmp_path: Path) -> None:
    """A webdataset-layout output trains exactly as its folders-layout twin: same pairs, same pixels."""
    folders, tars = tmp_path / "folders", tmp_path / "tars"
    folder_lines, tar_lines = [], []
    (tars / "tars").mkdir(parents=True)
    with tarfile.open(tars / "tars" / "shard-0.tar", "w") as archive:
        for key, name in (("a", "astronaut"), ("b", "coffee")):
            images = {"clean": photo(name), "degraded": inverted(photo(name))}
            record = {"key": key, "folder": "haze", "variant": "haze", "ratios": {"haze": 0.6}}
            folder_lines.append({**record, "clean": f"clean/{key}.png", "degraded": f"degraded/haze/{key}.png"})
            save(images["clean"], folders / "clean" / f"{key}.png")
            save(images["degraded"], folders / "degraded" / "haze" / f"{key}.png")
            for role, image in images.items():
                encoded = io.BytesIO()
                image.save(encoded, format="PNG")
                info = tarfile.TarInfo(f"{key}/haze.{role}.png")
                info.size = len(encoded.getvalue())
                archive.addfile(info, io.BytesIO(encoded.getvalue()))
            tar_lines.append(
                {
                    **record,
                    "tar": "tars/shard-0.tar",
                    "clean_member": f"{key}/haze.clean.png",
                    "degraded_member": f"{key}/haze.degraded.png",
                    "json_member": f"{key}/haze.json",
                }
            )
    escaping = {**tar_lines[0], "key": "c", "tar": "../folders/elsewhere.tar"}
    for root, lines in ((folders, folder_lines), (tars, tar_lines + [escaping])):
        (root / "manifest").mkdir()
        (root / "manifest" / "s.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    from_folders = dataset_from(tmp_path, [{"name": "f", "kind": "mdsd3_output", "dir": "folders"}])
    from_tars = dataset_from(tmp_path, [{"name": "t", "kind": "mdsd3_output", "dir": "tars"}])
    assert [str(pair.degraded) for pair in from_tars.pairs] == [
        f"{tars / 'tars' / 'shard-0.tar'}:a/haze.degraded.png",
        f"{tars / 'tars' / 'shard-0.tar'}:b/haze.degraded.png",
    ]
    assert from_tars.report.counts() == {BAD_RECORD: 1}
    assert "leaves" in from_tars.report.examples(BAD_RECORD)[0]
    for index in range(2):
        draw = Draw(index, identity=False, flip=False, crop_x=0.5, crop_y=0.5)
        expected, got = from_folders.load(draw), from_tars.load(draw)
        assert torch.equal(expected["clean"], got["clean"]) and torch.equal(expected["degraded"], got["degraded"])
        assert not torch.equal(got["clean"], got["degraded"])


def test_empty_dataset_is_an_error_naming_its_folders(tmp_path: Path) -> None:
    save(photo(), tmp_path / "clear" / "0001.png")
    save(photo(), tmp_path / "hazy" / "0001_0.8.png")
    spec = {"name": "reside", "kind": "paired_folders", "clean": "clear", "degraded": "hazy", "classes": {"haze": 1}}
    with pytest.raises(EmptyDatasetError) as caught:
        dataset_from(tmp_path, [spec])
    message = str(caught.value)
    assert "'reside'" in message and str(tmp_path / "clear") in message and str(tmp_path / "hazy") in message
    assert "0001_0.8.png" in message


# ---------------------------------------------------------------- loading and augmentation


@pytest.mark.parametrize("resize", ["short_side", "native"])
def test_crop_and_flip_are_identical_on_both_images(tmp_path: Path, resize: str) -> None:
    pairs = {name: (photo(name, (90, 60)), inverted(photo(name, (90, 60)))) for name in ("astronaut", "rocket")}
    dataset = dataset_from(tmp_path, [folders_dataset(tmp_path, pairs)], resize=resize, identity_fraction=0.0)
    batch = dataset.sample_batch(step=0, batch_size=24)

    assert batch["clean"].shape == batch["degraded"].shape == (24, 3, RESOLUTION, RESOLUTION)
    assert batch["clean"].min() >= -1 and batch["clean"].max() <= 1
    assert (batch["degraded"] + batch["clean"]).abs().max() <= 2.5 / 127.5  # 255 - x survives resize/crop/flip
    assert len({tuple(sample.flatten()[:64].tolist()) for sample in batch["clean"]}) > 12  # crops and flips vary
    draws = [dataset.draw(0, slot) for slot in range(24)]
    assert {draw.flip for draw in draws} == {True, False}


def test_center_crop_without_flip_is_fixed(tmp_path: Path) -> None:
    dataset = dataset_from(
        tmp_path,
        [folders_dataset(tmp_path, {"a": (photo(), inverted(photo()))})],
        random_crop=False,
        random_flip=False,
        identity_fraction=0.0,
    )
    batch = dataset.sample_batch(step=3, batch_size=3)
    assert torch.equal(batch["clean"][0], batch["clean"][1]) and torch.equal(batch["clean"][0], batch["clean"][2])
    expected = photo().resize((48, RESOLUTION), Image.Resampling.BICUBIC).crop((8, 0, 40, RESOLUTION))
    expected_tensor = torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(batch["clean"][0], expected_tensor)


def test_size_mismatch_is_skipped_and_reported_with_both_paths(tmp_path: Path) -> None:
    pairs = {"good": (photo(), inverted(photo())), "odd": (photo("coffee", (72, 48)), photo("coffee", (60, 40)))}
    dataset = dataset_from(tmp_path, [folders_dataset(tmp_path, pairs)], identity_fraction=0.0)
    batch = dataset.sample_batch(step=0, batch_size=16)

    assert (batch["degraded"] + batch["clean"]).abs().max() <= 2.5 / 127.5  # every sample is the good pair
    assert dataset.report.counts() == {SIZE_MISMATCH: 1}
    (detail,) = dataset.report.examples(SIZE_MISMATCH)
    assert str(tmp_path / "clean" / "odd.png") in detail and str(tmp_path / "degraded" / "odd.png") in detail
    assert "72x48" in detail and "60x40" in detail
    assert dataset.report.draws_skipped() >= 2


def test_corrupt_files_are_skipped_and_counted(tmp_path: Path) -> None:
    pairs = {"good": (photo(), inverted(photo())), "garbage": (photo(), photo()), "truncated": (photo(), photo())}
    spec = folders_dataset(tmp_path, pairs)
    (tmp_path / "degraded" / "garbage.png").write_bytes(b"not an image at all")
    truncated = tmp_path / "degraded" / "truncated.png"
    truncated.write_bytes(truncated.read_bytes()[:300])
    dataset = dataset_from(tmp_path, [spec], identity_fraction=0.0)
    batch = dataset.sample_batch(step=0, batch_size=24)

    assert (batch["degraded"] + batch["clean"]).abs().max() <= 2.5 / 127.5
    assert dataset.report.counts() == {UNREADABLE: 2}
    assert {Path(detail.split(":")[0]).name for detail in dataset.report.examples(UNREADABLE)} == {
        "garbage.png",
        "truncated.png",
    }


def test_no_usable_pair_raises(tmp_path: Path) -> None:
    spec = folders_dataset(tmp_path, {"a": (photo(), photo())})
    (tmp_path / "clean" / "a.png").write_bytes(b"broken")
    dataset = dataset_from(tmp_path, [spec])
    with pytest.raises(DatasetError, match="no usable pair"):
        dataset.sample_batch(0, 1)


# ---------------------------------------------------------------- sampling


def two_datasets(tmp_path: Path, **data: object):
    first = folders_dataset(tmp_path / "one", {n: (photo(n), inverted(photo(n))) for n in ("astronaut", "coffee")})
    second = folders_dataset(tmp_path / "two", {"rocket": (photo("rocket"), inverted(photo("rocket")))})
    first.update(clean="one/clean", degraded="one/degraded", name="one", weight=3.0)
    second.update(clean="two/clean", degraded="two/degraded", name="two", classes={"noise": 1.0})
    return dataset_from(tmp_path, [first, second], **data)


def test_sampling_is_deterministic_and_resumable(tmp_path: Path) -> None:
    dataset = two_datasets(tmp_path)
    again = build_dataset(load_train_recipe(tmp_path / "train.yaml"))
    first, repeat = dataset.sample_batch(5, 4), again.sample_batch(5, 4)
    for name in first:
        assert torch.equal(first[name], repeat[name])
    assert not torch.equal(first["clean"], dataset.sample_batch(6, 4)["clean"])

    uninterrupted = dict(dataset.batches(0, 6, batch_size=2, workers=0))
    resumed = dict(again.batches(3, 6, batch_size=2, workers=2))
    assert list(resumed) == [3, 4, 5]
    for step, batch in resumed.items():
        for name in batch:
            assert torch.equal(batch[name], uninterrupted[step][name])

    rank_one = dataset.sample_batch(5, 2, rank=1, world_size=2)
    assert torch.equal(rank_one["clean"], first["clean"][2:])


def mismatched_pair_list(tmp_path: Path) -> list[dict]:
    """Three good pairs and one whose images (each also in a good pair) differ in size."""
    sizes = {"a": ("astronaut", (72, 48)), "b": ("coffee", (60, 40)), "c": ("chelsea", (72, 48))}
    for key, (name, size) in sizes.items():
        save(photo(name, size), tmp_path / "gt" / f"{key}.png")
        save(inverted(photo(name, size)), tmp_path / "deg" / f"{key}.png")
    rows = [{"clean": f"gt/{key}.png", "degraded": f"deg/{key}.png"} for key in sizes]
    rows.append({"clean": "gt/a.png", "degraded": "deg/b.png"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return [{"name": "pairs", "kind": "pair_list", "list": "pairs.jsonl", "classes": {"haze": 1.0}}]


@pytest.mark.parametrize("workers", [0, 2])
def test_decode_once_decodes_each_image_and_flip_once_and_keeps_the_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """The trainer's loader with cached latents: what it decodes equals the plain loader's samples, each image
    and flip is decoded once per loader process, a placeholder only names keys decoded before, and the pair of
    mismatched sizes is still skipped."""
    datasets = mismatched_pair_list(tmp_path)
    plain = dataset_from(tmp_path, datasets, random_crop=False, identity_fraction=0.3)
    expected = dict(plain.batches(0, 12, batch_size=4, workers=0))
    decodes = count_decodes(monkeypatch)
    dataset = build_dataset(load_train_recipe(tmp_path / "train.yaml"))
    once = dict(dataset.batches(0, 12, batch_size=4, workers=workers, decode_once=True))

    assert list(once) == list(range(12))
    seen, placeholders = set(), 0
    for step, batch in once.items():
        for name in ("ratios", "identity", "clean_key", "degraded_key"):
            assert torch.equal(batch[name], expected[step][name]), (step, name)
        for row in range(4):
            for side in ("clean", "degraded"):
                key = int(batch[f"{side}_key"][row])
                if batch[f"{side}_decoded"][row]:
                    assert torch.equal(batch[side][row], expected[step][side][row]), (step, row, side)
                    seen.add(key)
                else:
                    assert key in seen, (step, row, side)  # sent before by this loader
                    placeholders += 1
    assert placeholders > 48  # most of the 96 images reuse what was decoded
    assert dataset.report.counts() == plain.report.counts() == {SIZE_MISMATCH: 1}
    assert dataset.report.draws_skipped() == plain.report.draws_skipped() > 0
    if workers == 0:  # the worker processes' decodes are not counted here
        mismatched = {tmp_path / "gt" / "a.png", tmp_path / "deg" / "b.png"}
        assert len(decodes) == 6  # once per flip, and once more where the mismatch is found
        assert all(count <= 2 + (path in mismatched) for path, count in decodes.items()), decodes
    with pytest.raises(ValueError, match="random_crop"):
        next(dataset_from(tmp_path, datasets).batches(0, 1, batch_size=1, decode_once=True))


def test_dataset_weights_are_respected(tmp_path: Path) -> None:
    dataset = two_datasets(tmp_path)
    picks = [dataset.pairs[dataset.draw(step, slot).pair_index].dataset for step in range(500) for slot in range(4)]
    assert picks.count("one") / len(picks) == pytest.approx(0.75, abs=0.04)


def test_identity_fraction_gives_clean_clean_pairs(tmp_path: Path) -> None:
    dataset = two_datasets(tmp_path, identity_fraction=0.3)
    identity = [dataset.draw(step, slot).identity for step in range(500) for slot in range(4)]
    assert sum(identity) / len(identity) == pytest.approx(0.3, abs=0.04)

    batch = dataset.sample_batch(0, 16)
    assert batch["identity"].dtype == torch.bool and 0 < int(batch["identity"].sum()) < 16
    for index, is_identity in enumerate(batch["identity"].tolist()):
        assert torch.equal(batch["clean"][index], batch["degraded"][index]) == is_identity
        assert (batch["ratios"][index].sum() == 0) == is_identity
    prompts = batch_prompts(batch["ratios"], ["haze", "noise"])
    assert {prompt for prompt, is_id in zip(prompts, batch["identity"].tolist()) if is_id} == {"clean"}
    assert set(prompts) <= {"clean", "haze", "noise"}


def test_condition_drop_mask_is_deterministic() -> None:
    mask = condition_drop_mask(seed=0, step=7, batch_size=8, p=0.5)
    assert mask.dtype == torch.bool and mask.shape == (8,)
    assert torch.equal(mask, condition_drop_mask(0, 7, 8, 0.5))
    assert torch.equal(condition_drop_mask(0, 7, 4, 0.5, rank=1), mask[4:])
    rate = torch.cat([condition_drop_mask(0, step, 8, 0.1) for step in range(500)]).float().mean()
    assert rate.item() == pytest.approx(0.1, abs=0.02)
    assert not condition_drop_mask(0, 7, 8, 0.0).any()


def test_exif_orientation_is_applied_before_pairing(tmp_path: Path) -> None:
    upright = photo("coffee", (72, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    save(inverted(upright), tmp_path / "degraded" / "a.png")
    (tmp_path / "clean").mkdir()
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "clean" / "a.png", exif=exif)
    spec = {"name": "pairs", "kind": "paired_folders", "clean": "clean", "degraded": "degraded", "classes": {"haze": 1}}
    dataset = dataset_from(tmp_path, [spec], identity_fraction=0.0)
    batch = dataset.sample_batch(0, 4)
    assert dataset.report.counts() == {}
    assert (batch["degraded"] + batch["clean"]).abs().max() <= 2.5 / 127.5
