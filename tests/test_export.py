"""`mdsd3 export`: round trips through the real consumers (lmdb read the way BasicSR reads it, Hugging Face
`datasets`, the `webdataset` loader), byte for byte against the folders layout; atomic destinations."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import datasets
import lmdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from mdsd3_cli.dataset.tar_format import flat_key
from mdsd3_cli.export import basicsr_lmdb
from mdsd3_cli.export import parquet as parquet_format
from mdsd3_cli.export import webdataset as webdataset_format
from mdsd3_cli.export.run import ExportError, run_export

from .helpers import FOLDERS, copy_dataset, generate, generate_recipe, mdsd3

META_LINE = re.compile(r"^([^. ]+)\.png \((\d+),(\d+),3\) 1$")


def folders_pairs(dataset: Path) -> dict[tuple[str, str], tuple[bytes, bytes]]:
    """(key, folder) -> (clean bytes, degraded bytes) of a folders-layout dataset."""
    pairs = {}
    for path in sorted((dataset / "manifest").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            pairs[record["key"], record["folder"]] = (
                (dataset / record["clean"]).read_bytes(),
                (dataset / record["degraded"]).read_bytes(),
            )
    return pairs


def basicsr_lmdb_paths(lq_folder: Path, gt_folder: Path) -> list[str]:
    """What BasicSR's `paired_paths_from_lmdb` does: keys from meta_info (text before the first dot), same sets."""
    lq_keys = [line.split(".")[0] for line in (lq_folder / "meta_info.txt").read_text().splitlines()]
    gt_keys = [line.split(".")[0] for line in (gt_folder / "meta_info.txt").read_text().splitlines()]
    assert set(lq_keys) == set(gt_keys), "BasicSR raises: keys in lq and gt folders are not the same"
    return sorted(lq_keys)


def basicsr_lmdb_get(folder: Path, key: str) -> bytes:
    """BasicSR's LmdbBackend.get: readonly, lock=False, readahead=False; the key ASCII-encoded."""
    environment = lmdb.open(str(folder), readonly=True, lock=False, readahead=False)
    try:
        with environment.begin(write=False) as transaction:
            return bytes(transaction.get(key.encode("ascii")))
    finally:
        environment.close()


def test_lmdb_export_reads_like_basicsr(folders_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(basicsr_lmdb, "COMMIT_BYTES", 5000)  # several transactions per database
    expected = folders_pairs(folders_dataset)
    run_export(folders_dataset, "lmdb", tmp_path / "lmdb")
    gt = tmp_path / "lmdb" / "gt.lmdb"
    keys = {flat_key(key): key for key, _ in expected}
    assert "sub/chelsea%2Ev2%20x" in keys  # a key with a dot and a space, escaped
    for folder in FOLDERS:
        lq = tmp_path / "lmdb" / f"lq_{folder}.lmdb"
        assert basicsr_lmdb_paths(lq, gt) == sorted(keys)
        for line in (lq / "meta_info.txt").read_text().splitlines():
            name, height, width = META_LINE.match(line).groups()
            assert (int(height), int(width)) == (32, 32) and name in keys
        for flat, key in keys.items():
            clean, degraded = expected[key, folder]
            assert basicsr_lmdb_get(gt, flat) == clean
            assert basicsr_lmdb_get(lq, flat) == degraded
    assert sorted(p.name for p in (tmp_path / "lmdb").iterdir()) == sorted(
        ["gt.lmdb", *(f"lq_{folder}.lmdb" for folder in FOLDERS)]
    )


def test_parquet_export_loads_with_datasets(folders_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(parquet_format, "ROW_GROUP_BYTES", 1)  # one row group per row: memory stays bounded
    expected = folders_pairs(folders_dataset)
    run_export(folders_dataset, "parquet", tmp_path / "parquet", per_file=4)
    files = sorted((tmp_path / "parquet").glob("*.parquet"))
    assert [pq.ParquetFile(path).metadata.num_row_groups for path in files] == [4, 4, 1]
    loaded = datasets.load_dataset(
        "parquet", data_dir=str(tmp_path / "parquet"), split="train", cache_dir=str(tmp_path / "hf_cache")
    )
    assert len(loaded) == len(expected)
    assert set(loaded.features["ratios"]) == {"rain", "haze", "noise"}
    for row in loaded:
        clean, degraded = expected[row["key"], row["folder"]]
        assert isinstance(row["clean"], Image.Image) and (row["width"], row["height"]) == (32, 32)
        np.testing.assert_array_equal(np.asarray(row["degraded"]), np.asarray(Image.open(io.BytesIO(degraded))))
        assert json.loads(row["manifest"])["key"] == row["key"]
    raw = loaded.cast_column("clean", datasets.Image(decode=False)).cast_column(
        "degraded", datasets.Image(decode=False)
    )
    for row in raw:
        assert (row["clean"]["bytes"], row["degraded"]["bytes"]) == expected[row["key"], row["folder"]]


def test_webdataset_export_reads_with_webdataset(folders_dataset, tmp_path):
    expected = folders_pairs(folders_dataset)
    summary = run_export(folders_dataset, "webdataset", tmp_path / "wds", per_file=2)
    assert summary.pairs == 9 and summary.how_to_read.endswith('data-{000000..000001}.tar")')
    samples = list(wds.WebDataset(str(tmp_path / "wds" / "data-{000000..000001}.tar"), shardshuffle=False))
    assert len(samples) == 3  # one per key: its clean image once, every variant beside it
    found = {}
    for sample in samples:
        for folder, record in json.loads(sample["json"]).items():
            assert sample["__key__"] == flat_key(record["key"])
            found[record["key"], folder] = (sample["clean.png"], sample[f"{folder}.degraded.png"])
    assert found == expected


def test_webdataset_layout_output_exports_the_same_pairs(folders_dataset, tiny_photos, tmp_path):
    """A dataset generated straight into tars exports to the same images as its folders-layout twin."""
    generate(
        generate_recipe(
            tmp_path / "recipe.yaml",
            tiny_photos,
            tmp_path / "in_tars",
            "output.layout=webdataset",
            "output.samples_per_tar=2",
        )
    )
    assert not (tmp_path / "in_tars" / "degraded").exists() and len(list((tmp_path / "in_tars" / "tars").iterdir())) > 1

    def exported(dataset: Path, name: str) -> dict[str, tuple[bytes, bytes]]:
        run_export(dataset, "webdataset", tmp_path / name, per_file=4)
        tars = sorted(str(path) for path in (tmp_path / name).glob("*.tar"))
        return {
            sample["__key__"]: {name: data for name, data in sample.items() if name.endswith(".png")}
            for sample in wds.WebDataset(tars, shardshuffle=False)
        }

    from_tars = exported(tmp_path / "in_tars", "from_tars")
    assert len(from_tars) == 3 and sum(len(images) for images in from_tars.values()) == 3 + 9
    assert from_tars == exported(folders_dataset, "from_folders")
    next((tmp_path / "in_tars" / "tars").iterdir()).unlink()
    with pytest.raises(ExportError, match="No such file"):
        run_export(tmp_path / "in_tars", "parquet", tmp_path / "parquet")
    assert not (tmp_path / "parquet").exists()


def test_export_appears_only_when_finished(folders_dataset, tmp_path, monkeypatch):
    destination = tmp_path / "out.lmdb_export"
    stale = tmp_path / f".{destination.name}.partial"
    stale.mkdir()
    (stale / "junk").write_bytes(b"a killed export")
    original = webdataset_format.TarWriter.write_key
    written = []

    def failing_write(self, samples):
        if len(written) == 2:  # the first tar is finished
            raise RuntimeError("disk full")
        written.append(samples)
        original(self, samples)

    monkeypatch.setattr(webdataset_format.TarWriter, "write_key", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        run_export(folders_dataset, "webdataset", destination, per_file=1)
    # no destination, no staging folder of its own; a `.partial` folder it did not create is never touched
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name]
    assert (stale / "junk").read_bytes() == b"a killed export"
    monkeypatch.undo()
    run_export(folders_dataset, "webdataset", destination, per_file=1)
    assert len(list(destination.glob("*.tar"))) == 3 and list(tmp_path.glob(".*")) == [stale]
    with pytest.raises(FileExistsError, match="exists"):
        run_export(folders_dataset, "webdataset", destination)


def test_export_refuses_an_unfinished_dataset(folders_dataset, tmp_path):
    dataset = copy_dataset(folders_dataset, tmp_path / "unfinished")
    manifest = sorted((dataset / "manifest").glob("*.jsonl"))[0]
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(ExportError, match="unfinished: .*1 of 9 pairs"):
        run_export(dataset, "parquet", tmp_path / "parquet")
    result = mdsd3("export", "--dataset", str(dataset), "--to", "lmdb", str(tmp_path / "x"))
    assert result.exit_code == 2 and "unfinished" in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "parquet").exists()


def test_export_refuses_damaged_images(folders_dataset, tmp_path):
    dataset = copy_dataset(folders_dataset, tmp_path / "damaged")
    victim = next((dataset / "degraded" / "rain").glob("*.png"))
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ExportError, match="SHA-256 differs"):
        run_export(dataset, "lmdb", tmp_path / "lmdb")
    assert not list(tmp_path.glob("*lmdb*")) and not list(tmp_path.glob(".*"))


def test_lmdb_export_with_one_lq_database_reads_like_basicsr(folders_dataset, tmp_path):
    expected = folders_pairs(folders_dataset)
    result = mdsd3("export", "--dataset", str(folders_dataset), "--to", "lmdb", "--one-lq", str(tmp_path / "lmdb"))
    assert result.exit_code == 0, result.output
    gt, lq = tmp_path / "lmdb" / "gt.lmdb", tmp_path / "lmdb" / "lq.lmdb"
    assert sorted(p.name for p in (tmp_path / "lmdb").iterdir()) == ["gt.lmdb", "lq.lmdb"]
    pair_keys = {f"{flat_key(key)}/{folder}": (key, folder) for key, folder in expected}
    assert basicsr_lmdb_paths(lq, gt) == sorted(pair_keys) and len(pair_keys) == 9  # one dataset, every pair
    for pair_key, (key, folder) in pair_keys.items():
        clean, degraded = expected[key, folder]
        assert basicsr_lmdb_get(gt, pair_key) == clean and basicsr_lmdb_get(lq, pair_key) == degraded
    for line in (lq / "meta_info.txt").read_text().splitlines():
        name, height, width = META_LINE.match(line).groups()
        assert (int(height), int(width)) == (32, 32) and name in pair_keys
    refused = mdsd3(
        "export", "--dataset", str(folders_dataset), "--to", "parquet", "--one-lq", str(tmp_path / "parquet")
    )
    assert refused.exit_code == 2 and "lmdb layout" in refused.output and not (tmp_path / "parquet").exists()
