"""`output.layout: webdataset`: tars read by the `webdataset` loader hold the folders layout's exact bytes;
kills at several moments and reruns rebuild the same tars; resume rules (manifest restore, shard count)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from mdsd3_cli.dataset.preview import contact_sheet
from mdsd3_cli.dataset.run_record import OutputConflictError
from mdsd3_cli.dataset.tar_format import flat_key, record_json
from mdsd3_cli.dataset.verify import verify_dataset
from mdsd3_cli.export.run import run_export
from mdsd3_cli.generate.plan import ShardSpec
from mdsd3_cli.generate.run import plan_run, run_generate
from mdsd3_cli.recipe.generate import load_recipe
from mdsd3_cli.recipe.train import Mdsd3OutputDataset
from mdsd3_cli.train.data import DataReport, discover_pairs

from .helpers import FOLDERS, PHOTOS, generate, generate_recipe

PER_TAR = 1
TARS = [f"shard-00000-of-00001-{index:06d}.tar" for index in range(3)]  # 3 keys (x 3 folders), 1 key per tar


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((out / "tars").glob("*.tar"))}


def manifest_lines(out: Path) -> list[str]:
    return [line for path in sorted((out / "manifest").glob("*.jsonl")) for line in path.read_text().splitlines()]


def webdataset_recipe(root: Path, photos: Path, samples_per_tar: int = PER_TAR) -> Path:
    overrides = "output.layout=webdataset", f"output.samples_per_tar={samples_per_tar}"
    return generate_recipe(root / "recipe.yaml", photos, root / "out", *overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_photos) -> Path:
    """One uninterrupted webdataset run of the folders_dataset recipe."""
    root = tmp_path_factory.mktemp("webdataset_reference")
    generate(webdataset_recipe(root, tiny_photos))
    return root / "out"


def test_tars_hold_the_folders_layouts_bytes(reference, folders_dataset):
    assert list(tar_bytes(reference)) == TARS
    folders_records = {(r["key"], r["folder"]): r for r in map(json.loads, manifest_lines(folders_dataset))}
    urls = [str(reference / "tars" / name) for name in TARS]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 3 and len(folders_records) == 9  # one sample per key, each clean image once
    records = []
    for sample in samples:
        by_folder = json.loads(sample["json"])
        assert "." not in sample["__key__"] and list(by_folder) == sorted(FOLDERS)
        for folder, record in by_folder.items():
            expected = folders_records[record["key"], folder]
            assert sample["clean.png"] == (folders_dataset / expected["clean"]).read_bytes()
            assert sample[f"{folder}.degraded.png"] == (folders_dataset / expected["degraded"]).read_bytes()
            assert record["degraded_sha256"] == expected["degraded_sha256"]
            records.append(record)
    assert {(r["key"], r["folder"]) for r in records} == set(folders_records)
    assert sorted(manifest_lines(reference)) == sorted(record_json(record).decode() for record in records)
    assert verify_dataset(reference).ok


def test_preview_reads_the_tars(reference, folders_dataset):
    from_tars = np.asarray(contact_sheet(reference, count=3, cell=32))
    assert from_tars.shape == (18 + 3 * (32 + 18), 4 * 32, 3)
    np.testing.assert_array_equal(from_tars, np.asarray(contact_sheet(folders_dataset, count=3, cell=32)))


def test_tar_membership_follows_the_plan(reference):
    with tarfile.open(reference / "tars" / TARS[0]) as archive:
        members = archive.getmembers()
    assert [m.name for m in members] == [
        "astronaut.clean.png",
        "astronaut.rain.degraded.png",
        "astronaut.mix_r1.degraded.png",
        "astronaut.mix_r2.degraded.png",
        "astronaut.json",
    ]
    assert {(m.mtime, m.mode, m.uid, m.uname) for m in members} == {(0, 0o644, 0, "")}


@pytest.mark.parametrize("moment", ["temp tar", "1 tar", "2 tars"])
def test_killed_run_rebuilds_the_same_tars(reference, tiny_photos, tmp_path, moment):
    out = tmp_path / "out"
    recipe = webdataset_recipe(tmp_path, tiny_photos)
    process = subprocess.Popen(
        [sys.executable, "-m", "mdsd3_cli", "generate", "--config", str(recipe)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        tars = out / "tars"
        if list(tars.glob(".*.tmp")) if moment == "temp tar" else len(list(tars.glob("*.tar"))) >= int(moment[0]):
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    survivors = tar_bytes(out) if (out / "tars").is_dir() else {}
    if (out / "manifest").is_dir():  # a killed run is never "ok" (issue 27, item 1) ...
        report = verify_dataset(out)
        if list((out / "manifest").glob("*.finished.json")):  # ... unless it finished before the kill landed
            assert report.ok, report.problems
        else:
            assert not report.ok and [p.kind for p in report.problems][:1] == ["unfinished"], report.problems
    for name, data in survivors.items():  # a visible tar is always a finished one
        assert data == tar_bytes(reference)[name], name
    stats = {name: os.stat(out / "tars" / name) for name in survivors}

    generate(recipe)
    assert tar_bytes(out) == tar_bytes(reference)
    for name, before in stats.items():  # finished tars are never rewritten
        after = os.stat(out / "tars" / name)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    lines = manifest_lines(out)
    assert sorted(lines) == sorted(manifest_lines(reference)) and len(set(lines)) == len(lines)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_manifest_lines_lost_after_a_rename_are_restored(reference, tmp_path):
    out = shutil.copytree(reference, tmp_path / "out")
    manifest = out / "manifest" / "shard-00000-of-00001.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:-2]) + lines[-1][:10])  # the last tar's lines: one missing, one torn
    recipe = load_recipe(reference.parent / "recipe.yaml", [f"output.dir={out}"])
    summary = run_generate(plan_run(recipe, ShardSpec(0, 1)))
    assert summary.written == 0 and summary.exit_code == 0
    assert sorted(manifest.read_text().splitlines()) == sorted(manifest_lines(reference))
    assert tar_bytes(out) == tar_bytes(reference)


@pytest.mark.parametrize(
    "shard, limit, message", [(ShardSpec(1, 2), None, "with .1. shards"), (ShardSpec(0, 1), 2, "another plan")]
)
def test_resuming_another_plan_is_refused(reference, tmp_path, shard, limit, message):
    out = shutil.copytree(reference, tmp_path / "out")
    (out / "tars" / TARS[-1]).unlink()
    recipe = load_recipe(reference.parent / "recipe.yaml", [f"output.dir={out}"])
    with pytest.raises(OutputConflictError, match=message):
        run_generate(plan_run(recipe, shard, limit))
    assert sorted(tar_bytes(out)) == TARS[:-1]


def test_failed_inputs_are_left_out_of_their_tar(tiny_photos, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(tiny_photos / PHOTOS["astronaut"], photos / "astronaut.png")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    recipe = webdataset_recipe(tmp_path, photos, samples_per_tar=2)
    summary = run_generate(plan_run(load_recipe(recipe), ShardSpec(0, 1)))
    assert summary.exit_code == 1 and summary.failed_inputs == 1
    out = tmp_path / "out"
    assert list(tar_bytes(out)) == TARS[:1]  # astronaut and broken share a tar; broken is left out
    with tarfile.open(out / "tars" / TARS[0]) as archive:
        degraded = [f"astronaut.{folder}.degraded.png" for folder in FOLDERS]
        assert archive.getnames() == ["astronaut.clean.png", *degraded, "astronaut.json"]
    assert verify_dataset(out).ok


def test_verify_checks_tar_members(reference, tmp_path):
    out = shutil.copytree(reference, tmp_path / "out")
    with tarfile.open(out / "tars" / TARS[0]) as archive:
        member = archive.getmember("astronaut.mix_r2.degraded.png")
    with open(out / "tars" / TARS[0], "r+b") as handle:  # flip one byte of that member's data in place
        handle.seek(member.offset_data + member.size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 1]))
    (out / "tars" / TARS[2]).unlink()
    (out / "tars" / f".{TARS[2]}.tmp").write_bytes(b"a killed run's partial tar")
    with tarfile.open(reference / "tars" / TARS[2]) as archive:
        lost = archive.getnames()
    found = {(p.kind, p.where) for p in verify_dataset(out).problems}
    assert ("hash", f"tars/{TARS[0]}:astronaut.mix_r2.degraded.png") in found
    assert ("orphan", f"tars/.{TARS[2]}.tmp") in found
    assert {where for kind, where in found if kind == "missing"} == {f"tars/{TARS[2]}:{name}" for name in lost}
    assert len(lost) == 5  # the key's clean image, its 3 variants and its records


def test_overwrite_replaces_every_planned_tar(reference, tmp_path):
    out = shutil.copytree(reference, tmp_path / "out")
    manifest = out / "manifest" / "shard-00000-of-00001.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:-1]))  # killed between the last tar's rename and its manifest lines
    (out / "tars" / f".{TARS[2]}.tmp").write_bytes(b"partial")
    recipe = load_recipe(reference.parent / "recipe.yaml", [f"output.dir={out}", "sampling.seed=4"])
    with pytest.raises(OutputConflictError):
        run_generate(plan_run(recipe, ShardSpec(0, 1)))
    summary = run_generate(plan_run(recipe, ShardSpec(0, 1)), overwrite=True)
    assert summary.written == 9 and list(tar_bytes(out)) == TARS
    old, new = tar_bytes(reference), tar_bytes(out)
    assert all(old[name] != new[name] for name in TARS)  # the unlisted last tar was replaced too
    assert {json.loads(line)["seed"] for line in manifest_lines(out)}.isdisjoint(
        json.loads(line)["seed"] for line in manifest_lines(reference)
    )
    assert verify_dataset(out).ok


def as_earlier_version(out: Path) -> None:
    """Rewrite a webdataset-layout output the way earlier mdsd3 versions wrote it: one sample per (key, folder),
    `<key>/<folder>.clean.png`, `.degraded.png` and `.json` (the record), and no `tar_sample` in its identity."""
    lines = []
    for tar in sorted((out / "tars").glob("*.tar")):
        with tarfile.open(tar) as source:
            members = {name: source.extractfile(name).read() for name in source.getnames()}
        with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as target:
            for name in [name for name in members if name.endswith(".json")]:
                for folder, record in json.loads(members[name]).items():
                    stem = f"{flat_key(record['key'])}/{flat_key(folder)}"
                    old = {
                        "clean_member": f"{stem}.clean.png",
                        "degraded_member": f"{stem}.degraded.png",
                        "json_member": f"{stem}.json",
                    }
                    old_record = {**record, **old}
                    images = (members[record["clean_member"]], members[record["degraded_member"]])
                    for member, data in zip(old.values(), (*images, record_json(old_record))):
                        info = tarfile.TarInfo(member)
                        info.size = len(data)
                        target.addfile(info, io.BytesIO(data))
                    lines.append(record_json(old_record).decode() + "\n")
    (out / "manifest" / "shard-00000-of-00001.jsonl").write_text("".join(lines))
    run = json.loads((out / "run.json").read_text())
    del run["identity"]["output"]["tar_sample"]
    (out / "run.json").write_text(json.dumps(run))


def test_an_earlier_versions_output_is_read_but_not_resumed(reference, folders_dataset, tmp_path):
    out = shutil.copytree(reference, tmp_path / "out")
    as_earlier_version(out)
    with tarfile.open(out / "tars" / TARS[0]) as archive:
        assert {"astronaut/rain.clean.png", "astronaut/rain.degraded.png"} <= set(archive.getnames())
    assert verify_dataset(out).ok
    np.testing.assert_array_equal(
        np.asarray(contact_sheet(out, count=3, cell=32)), np.asarray(contact_sheet(folders_dataset, count=3, cell=32))
    )
    report = DataReport()
    spec = Mdsd3OutputDataset(name="old", kind="mdsd3_output", dir=out)
    pairs = discover_pairs(spec, ["rain", "haze", "noise"], report)
    assert len(pairs) == 9 and pairs[0].degraded.read_rgb().size == pairs[0].clean.read_rgb().size
    run_export(out, "parquet", tmp_path / "parquet")
    recipe = load_recipe(reference.parent / "recipe.yaml", [f"output.dir={out}"])
    with pytest.raises(OutputConflictError, match=r"output\.tar_sample: \(none\) → \"key\""):
        run_generate(plan_run(recipe, ShardSpec(0, 1)))
