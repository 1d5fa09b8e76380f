"""Issue 27, items 1, 2 and 7: unfinished runs are reported and refused, an export stops when the manifest changes
under it, and a webdataset tar group with a failed input completes. Tiny preset, in process; a run is cut short by
an exception or a real SIGTERM from its own sampler (a kill -9 of a real process is in test_webdataset_layout)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import tarfile
from pathlib import Path

import lmdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from mdsd3_cli.dataset.ownership import shard_lock
from mdsd3_cli.dataset.verify import verify_dataset
from mdsd3_cli.export import run as export_run
from mdsd3_cli.export.check import verify_export
from mdsd3_cli.export.run import ExportError, run_export
from mdsd3_cli.export.staging import PARTIAL_FILE
from mdsd3_cli.generate.plan import ShardSpec
from mdsd3_cli.generate.run import plan_run, run_generate
from mdsd3_cli.pipeline.pipeline import MDSD3Pipeline
from mdsd3_cli.recipe.generate import load_recipe

from .helpers import PHOTOS, copy_dataset, generate_recipe, mdsd3

SHARD = "shard-00000-of-00001"


class Killed(Exception):
    """Stands for a kill: the run stops at once, its finished marker unwritten."""


def cut_short(monkeypatch, after_batches: int, action) -> None:
    """Make the sampler run `after_batches` batches, then call `action` (raise, or send a signal)."""
    original, calls = MDSD3Pipeline.__call__, []

    def sample(self, batch, steps, guidance):
        if len(calls) == after_batches:
            action()
        calls.append(1)
        return original(self, batch, steps, guidance)

    monkeypatch.setattr(MDSD3Pipeline, "__call__", sample)


def raise_killed() -> None:
    raise Killed


def recipe_at(tmp_path: Path, photos: Path, layout: str, per_tar: int = 1) -> Path:
    overrides = f"output.layout={layout}", f"output.samples_per_tar={per_tar}"
    return generate_recipe(tmp_path / f"{layout}.yaml", photos, tmp_path / layout, *overrides)


def run(recipe: Path, *overrides: str):
    return run_generate(plan_run(load_recipe(recipe, list(overrides)), ShardSpec(0, 1)))


def unfinished(dataset: Path) -> list[str]:
    return [problem.detail for problem in verify_dataset(dataset, workers=2).problems if problem.kind == "unfinished"]


def photos_with_a_broken_one(tiny_photos: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(tiny_photos / PHOTOS["astronaut"], folder / "astronaut.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


# item 1: an unfinished run is neither ok nor exportable


@pytest.mark.parametrize("layout", ["folders", "webdataset"])
def test_a_killed_run_is_unfinished_for_verify_and_export(tiny_photos, tmp_path, monkeypatch, layout):
    recipe = recipe_at(tmp_path, tiny_photos, layout)
    cut_short(monkeypatch, 1, raise_killed)
    with pytest.raises(Killed):
        run(recipe, "sampling.batch_size=3")  # one batch: one whole key (3 variant folders) of 3
    monkeypatch.undo()
    out = tmp_path / layout
    assert unfinished(out) == [f"{SHARD}: unfinished, 3 of 9 samples recorded (rerun generate)"]
    result = mdsd3("verify", "--dataset", str(out))
    assert result.exit_code == 1 and "unfinished" in result.output, result.output
    with pytest.raises(ExportError, match="3 of 9 samples recorded.*--partial"):
        run_export(out, "webdataset", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    summary = run_export(out, "lmdb", tmp_path / "partial", partial=True)
    assert summary.pairs == 3 and summary.partial
    assert "3 of 9 samples recorded" in json.loads((tmp_path / "partial" / PARTIAL_FILE).read_text())["why"][0]

    assert run(recipe, "sampling.batch_size=3").exit_code == 0
    report = verify_dataset(out, workers=2)
    assert report.ok, report.problems
    assert report.run_state() == "complete (1 of 1 shards finished)"


def test_verify_and_export_see_a_live_generate(folders_dataset, tmp_path):
    dataset = copy_dataset(folders_dataset, tmp_path / "dataset")
    with shard_lock(dataset, SHARD):  # what a live generate holds
        assert unfinished(dataset) == [
            f"{SHARD}: a generate is writing it now (PID {os.getpid()}), 9 of 9 samples so far"
        ]
        assert mdsd3("verify", "--dataset", str(dataset)).exit_code == 1
        with pytest.raises(ExportError, match="a generate is writing it now"):
            run_export(dataset, "webdataset", tmp_path / "refused")
    assert verify_dataset(dataset, workers=2).ok


def test_lost_records_and_a_shard_that_never_ran_are_unfinished(folders_dataset, tmp_path):
    lost = copy_dataset(folders_dataset, tmp_path / "lost")
    manifest = lost / "manifest" / f"{SHARD}.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(line for line in lines if '"key":"coffee"' not in line))  # a whole key
    assert unfinished(lost) == [
        "the manifests list 6 samples, the finished shards planned 9 (records were lost: rerun generate)"
    ]
    sharded = copy_dataset(folders_dataset, tmp_path / "sharded")
    for path in (sharded / "manifest").glob(f"{SHARD}.*"):
        content = path.read_text().replace(SHARD, "shard-00000-of-00002")
        path.unlink()
        (path.parent / path.name.replace(SHARD, "shard-00000-of-00002")).write_text(content)
    assert unfinished(sharded) == ["shard-00001-of-00002: never ran (no plan recorded)"]


def test_a_shard_whose_failed_inputs_are_listed_is_finished(tiny_photos, tmp_path):
    recipe = recipe_at(tmp_path, photos_with_a_broken_one(tiny_photos, tmp_path / "photos"), "folders")
    assert run(recipe).exit_code == 1
    report = verify_dataset(tmp_path / "folders", workers=2)
    assert report.ok and report.failed_inputs == 1, report.problems
    assert report.completeness.shards[0].describe() == f"{SHARD}: finished, 1 inputs failed (errors/)"
    marker = json.loads((tmp_path / "folders" / "manifest" / f"{SHARD}.finished.json").read_text())
    assert marker["failed_keys"] == ["broken"] and marker["samples"] == 6


# item 2: the manifest changes during an export


def test_an_export_stops_when_the_manifest_changes_under_it(folders_dataset, tmp_path, monkeypatch):
    dataset = copy_dataset(folders_dataset, tmp_path / "dataset")
    manifest = dataset / "manifest" / f"{SHARD}.jsonl"
    original = export_run.plan_export

    def plan_then_swap(*args, **kwargs):
        plan = original(*args, **kwargs)
        lines = manifest.read_text().splitlines(keepends=True)
        lines[0], lines[1] = lines[1], lines[0]  # what `generate --overwrite` rewriting the manifest may do
        manifest.write_text("".join(lines))
        return plan

    monkeypatch.setattr(export_run, "plan_export", plan_then_swap)
    with pytest.raises(ExportError, match="the dataset changed during the export"):
        run_export(dataset, "webdataset", tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dataset"]  # nothing published, no staging left


# item 7: a failed input settles its tar group; a stop says what was kept


def test_a_failed_input_does_not_make_its_tar_group_redo(tiny_photos, tmp_path):
    recipe = recipe_at(tmp_path, photos_with_a_broken_one(tiny_photos, tmp_path / "photos"), "webdataset", 2)
    first = run(recipe)
    assert first.exit_code == 1 and first.written == 3
    tar = tmp_path / "webdataset" / "tars" / f"{SHARD}-000000.tar"
    before = os.stat(tar)
    again = run(recipe)
    assert (again.written, again.already_done, again.failed_inputs, again.exit_code) == (0, 3, 1, 1)
    after = os.stat(tar)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    errors = (tmp_path / "webdataset" / "errors" / f"{SHARD}.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in errors] == ["broken"]  # still listed after the rerun
    report = verify_dataset(tmp_path / "webdataset", workers=2)
    assert report.ok and report.failed_inputs == 1, report.problems


def test_a_stop_inside_a_tar_group_reports_only_what_was_kept(tiny_photos, tmp_path, monkeypatch):
    recipe = recipe_at(tmp_path, tiny_photos, "webdataset", 3)  # one tar of 3 keys
    cut_short(monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    stopped = run(recipe, "sampling.batch_size=3")
    monkeypatch.undo()
    assert stopped.interrupted == "SIGTERM" and (stopped.written, stopped.dropped) == (0, 6)
    terminal = Console(record=True, width=200)
    terminal.print(stopped.table())
    assert re.search(r"sampled, not kept +│ 6 \(their tar was unfinished", terminal.export_text())
    resumed = plan_run(load_recipe(recipe, ["sampling.batch_size=3"]), ShardSpec(0, 1))
    assert resumed.samples_in_shard - resumed.samples_to_do == stopped.written  # what a rerun finds done


# low: duplicate tar members, numbers JSON allows but writers refuse


def test_verify_finds_a_duplicate_tar_member(tiny_photos, tmp_path):
    recipe = recipe_at(tmp_path, tiny_photos, "webdataset")
    assert run(recipe).exit_code == 0
    tar = tmp_path / "webdataset" / "tars" / f"{SHARD}-000000.tar"
    with tarfile.open(tar) as archive:
        first = archive.getmembers()[0]
        data = archive.extractfile(first).read()
    with tarfile.open(tar, "a") as archive:
        archive.addfile(first, io.BytesIO(data))
    problems = verify_dataset(tmp_path / "webdataset", workers=2).problems
    assert [(problem.kind, problem.where) for problem in problems] == [("duplicate", f"tars/{tar.name}:{first.name}")]


@pytest.mark.parametrize("value", ["1e999", "-1e999", "1" + "0" * 400])
def test_a_ratio_no_writer_can_store_is_named(folders_dataset, tmp_path, value):
    dataset = copy_dataset(folders_dataset, tmp_path / "dataset")
    manifest = dataset / "manifest" / f"{SHARD}.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"ratios":{"haze":', f'"ratios":{{"haze":{value},"was":', 1)
    manifest.write_text("".join(lines))
    problems = [(p.kind, p.where, p.detail) for p in verify_dataset(dataset, workers=2).problems]
    assert problems == [
        (
            "manifest",
            f"manifest/{SHARD}.jsonl:2",
            "field 'ratios' holds a number that is infinite, NaN or too large for a 64-bit float",
        )
    ]
    for to in ("webdataset", "parquet"):
        with pytest.raises(ExportError, match=rf"{SHARD}\.jsonl:2: field 'ratios'"):
            run_export(dataset, to, tmp_path / to)


# item 1: verify checks an export's destination against its own metadata


def damage_export(folder: Path, to: str) -> str:
    """Change one stored image of an export; returns the problem kind verify must report."""
    if to == "webdataset":
        tar = folder / "data-000000.tar"
        with tarfile.open(tar) as archive:
            members = [(member, archive.extractfile(member).read()) for member in archive.getmembers()]
        with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as archive:
            for index, (member, data) in enumerate(members):
                archive.addfile(member, io.BytesIO(data[:-1] + bytes([data[-1] ^ 1]) if index == 1 else data))
        return "hash"
    if to == "lmdb":
        environment = lmdb.open(str(folder / "lq_rain.lmdb"))
        with environment.begin(write=True) as transaction:
            transaction.delete(next(iter(transaction.cursor().iternext(values=False))))
        environment.close()
        return "incomplete"
    path = folder / "data-00000.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows[0]["degraded"]["bytes"] = rows[0]["degraded"]["bytes"][:-1] + b"\x00"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    return "hash"


@pytest.mark.parametrize("to", ["webdataset", "lmdb", "parquet"])
def test_verify_checks_an_export_against_its_own_metadata(folders_dataset, tmp_path, to):
    exported = tmp_path / to
    run_export(folders_dataset, to, exported)
    result = mdsd3("verify", "--dataset", str(exported))
    assert result.exit_code == 0 and f"{to} export" in result.output, result.output
    report = verify_export(exported)
    assert report.ok and report.files == (12 if to == "webdataset" else 18 if to == "parquet" else 12), report.problems
    kind = damage_export(exported, to)
    assert kind in {problem.kind for problem in verify_export(exported).problems}
    assert mdsd3("verify", "--dataset", str(exported)).exit_code == 1


def test_verify_reports_a_partial_export(folders_dataset, tmp_path):
    dataset = copy_dataset(folders_dataset, tmp_path / "dataset")
    with shard_lock(dataset, SHARD):
        run_export(dataset, "parquet", tmp_path / "partial", partial=True)
    problems = verify_export(tmp_path / "partial").problems
    assert [problem.kind for problem in problems] == ["unfinished"]
    assert "a --partial export: " in problems[0].detail and "a generate is writing it now" in problems[0].detail
