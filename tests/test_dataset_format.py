"""dataset/ owns the on-disk format: its names, the one manifest reader every reader uses, the layout registry."""

from __future__ import annotations

import os
import shutil
import threading
import typing
from pathlib import Path

import numpy as np

from mdsd3_cli.dataset.folders_writer import FoldersWriter, completed_samples
from mdsd3_cli.dataset.layout_writer import LayoutWriter
from mdsd3_cli.dataset.layouts import OUTPUT_LAYOUTS
from mdsd3_cli.dataset.manifest import record_ratios, run_folders
from mdsd3_cli.dataset.names import parse_shard, parse_tar_name, shard_name, tar_name
from mdsd3_cli.dataset.ownership import manifest_listed_files
from mdsd3_cli.dataset.reader import BadLine, manifest_entries
from mdsd3_cli.recipe.generate import OutputSection, Variant
from mdsd3_cli.recipe.train import DATASET_KINDS
from mdsd3_cli.train.data import DATASET_DISCOVERY

SHARD = "shard-00000-of-00001"
PIXELS = np.full((8, 8, 3), 9, dtype=np.uint8)


def test_shard_and_tar_names_round_trip_and_nothing_else_parses() -> None:
    assert shard_name(3, 8) == "shard-00003-of-00008" and parse_shard("shard-00003-of-00008") == (3, 8)
    assert tar_name(shard_name(3, 8), 12) == "shard-00003-of-00008-000012.tar"
    assert parse_tar_name(tar_name(shard_name(3, 8), 12)) == (3, 8, 12)
    for name in ("shard-3-of-8", "shard-00003-of-00008.jsonl", "0of1", "shard-00003-of-00008-12.tar", "x.tar"):
        assert parse_shard(name) is None and parse_tar_name(name) is None


def test_run_json_folders_follow_the_recipes_repeat_rule() -> None:
    variants = [Variant(name="rain", classes={"rain": 1.0}), Variant(name="mix", classes={"haze": 0.5}, repeats=3)]
    info = {"recipe": {"variants": [variant.model_dump(mode="json") for variant in variants]}}
    assert run_folders(info) == [folder for variant in variants for folder in variant.folders()]
    assert run_folders(info) == ["rain", "mix_r1", "mix_r2", "mix_r3"]


def test_every_output_layout_is_a_layout_writer_the_recipe_can_name() -> None:
    assert set(OUTPUT_LAYOUTS) == set(typing.get_args(OutputSection.model_fields["layout"].annotation))
    assert all(issubclass(writer, LayoutWriter) for writer in OUTPUT_LAYOUTS.values())


def test_every_training_dataset_kind_has_a_discovery_function() -> None:
    assert set(DATASET_DISCOVERY) == set(DATASET_KINDS)


def test_the_reader_hands_each_bad_line_to_its_caller_and_yields_the_rest(tmp_path: Path) -> None:
    with FoldersWriter(tmp_path, SHARD) as writer:
        writer.submit({"key": "a", "folder": "rain", "ratios": {"rain": 1.0}}, PIXELS, PIXELS)
        writer.drain()
        writer.submit({"key": "b", "folder": "rain", "ratios": {"rain": "x"}}, PIXELS, PIXELS)
    manifest = tmp_path / "manifest" / f"{SHARD}.jsonl"
    good = manifest.read_bytes()
    with open(manifest, "ab") as file:
        file.write(b"\nnot json\n" + good.splitlines(keepends=True)[0][:20])  # blank, garbage, an unfinished line
    bad: list[BadLine] = []
    entries = list(manifest_entries(tmp_path, check=record_ratios, bad=bad.append))
    assert [entry.sample for entry in entries] == [("a", "rain")]
    assert entries[0].offset == 0 and entries[0].line == good.splitlines(keepends=True)[0]
    assert entries[0].clean.path == tmp_path / "clean" / "a.png" and entries[0].degraded.read_bytes()
    assert [(line.number, line.blank, line.unfinished) for line in bad] == [
        (2, False, False),  # b's ratios, refused by `check`
        (3, True, False),
        (4, False, False),
        (5, False, True),
    ]
    assert "ratios" in bad[0].reason and bad[0].where == f"{manifest}:2"


def test_resume_and_overwrite_read_no_manifest_that_is_a_link_or_a_pipe(tmp_path: Path) -> None:
    """Every manifest reader skips what verify reports as "not a regular file": resume never counts a linked
    manifest's records, and --overwrite's listing never waits on a pipe."""
    foreign = tmp_path / "foreign"
    with FoldersWriter(foreign, SHARD) as writer:
        writer.submit({"key": "a", "folder": "rain"}, PIXELS, PIXELS)
    out = tmp_path / "out"
    shutil.copytree(foreign / "clean", out / "clean")
    shutil.copytree(foreign / "degraded", out / "degraded")
    (out / "manifest").mkdir()
    (out / "manifest" / f"{SHARD}.jsonl").symlink_to(foreign / "manifest" / f"{SHARD}.jsonl")
    assert completed_samples(foreign) == {("a", "rain")}
    assert completed_samples(out) == set() and manifest_listed_files(out) == []

    os.mkfifo(out / "manifest" / "shard-00001-of-00002.jsonl")
    found: list[object] = []
    listing = threading.Thread(target=lambda: found.append(manifest_listed_files(out)), daemon=True)
    listing.start()
    listing.join(timeout=20)
    assert found == [[]], "the listing waited on a pipe"
