"""Output ownership: only empty or mdsd3-made folders are written, `--overwrite` removes only recorded files,
one process per shard, the output folder is never an input, key schemes and batch size are run identity."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mdsd3_cli.dataset.folders_writer import FoldersWriter
from mdsd3_cli.dataset.ownership import ShardBusyError, claim_output, clear_outputs, shard_lock
from mdsd3_cli.dataset.run_record import OutputConflictError, check_run_compatible, write_run_json
from mdsd3_cli.generate.plan import ShardSpec
from mdsd3_cli.generate.run import describe_plan, free_space_warning, plan_run
from mdsd3_cli.recipe.generate import load_recipe

from .helpers import generate_recipe, mdsd3, photo_files, write_photos, yaml_text

PIXELS = np.full((16, 16, 3), 9, dtype=np.uint8)


def test_a_folder_mdsd3_did_not_make_is_refused_by_generate_and_check(tmp_path):
    photos = write_photos(tmp_path / "photos", photo_files("astronaut"))
    out = tmp_path / "O"
    (out / "clean").mkdir(parents=True)
    for name in ("astronaut.png", "mine.png"):
        (out / "clean" / name).write_bytes(b"user file")
    recipe = generate_recipe(tmp_path / "r.yaml", photos, out)
    for command in (["generate"], ["generate", "--overwrite"], ["check"]):
        result = mdsd3(*command, "--config", str(recipe))
        assert result.exit_code == 2 and "mdsd3 did not make it" in result.stderr, (command, result.stderr)
    assert {p.name: p.read_bytes() for p in (out / "clean").iterdir()} == {
        "astronaut.png": b"user file",
        "mine.png": b"user file",
    }
    assert sorted(p.name for p in out.iterdir()) == ["clean"]


def test_empty_and_own_folders_are_claimed(tmp_path):
    claim_output(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    claim_output(tmp_path / "empty")
    write_run_json(tmp_path / "own", {"identity": {}})
    (tmp_path / "own" / "notes.md").write_text("mine")
    claim_output(tmp_path / "own")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputConflictError, match="not a folder"):
        claim_output(tmp_path / "file")


def test_overwrite_removes_only_recorded_files(tmp_path):
    out = tmp_path / "O"
    with FoldersWriter(out, "shard-00000-of-00001") as writer:
        writer.submit({"key": "a", "folder": "rain"}, PIXELS, PIXELS)
        writer.record_error("b", "/in/b.jpg", "empty file")
    write_run_json(out, {"identity": {}})
    (out / "clean" / "mine.png").write_bytes(b"user file")
    (out / "notes.md").write_text("mine")
    (out / "analysis").mkdir()
    clear_outputs(out)
    remaining = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert remaining == ["analysis", "clean", "clean/mine.png", "notes.md"]


def test_a_second_process_on_the_same_shard_is_refused_with_the_holders_pid(tmp_path):
    photos = write_photos(tmp_path / "photos", photo_files("astronaut"))
    out = tmp_path / "O"
    recipe = generate_recipe(tmp_path / "r.yaml", photos, out)
    write_run_json(out, {"identity": load_recipe(recipe).identity()})
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from mdsd3_cli.dataset.ownership import shard_lock\n"
            f"with shard_lock({str(out)!r}, 'shard-00000-of-00001'):\n    print('locked', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = mdsd3("generate", "--config", str(recipe))
        assert result.exit_code == 2 and f"PID {holder.pid}" in result.stderr
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
        with pytest.raises(ShardBusyError):  # also within one process
            shard_lock(out, "shard-00000-of-00001").__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with shard_lock(out, "shard-00000-of-00001"):  # kill -9 leaves no stale lock
        pass


def test_the_output_folder_inside_an_input_folder_is_not_an_input(tmp_path):
    photos = write_photos(tmp_path / "photos", photo_files("astronaut", "coffee"))
    out = photos / "out"
    (out / "clean").mkdir(parents=True)
    Image.fromarray(PIXELS).save(out / "clean" / "astronaut.png")
    write_run_json(out, {"identity": {}})
    run = plan_run(load_recipe(generate_recipe(tmp_path / "r.yaml", photos, out)), ShardSpec(0, 1))
    assert sorted(source.key for source in run.discovery.sources) == ["astronaut", "coffee"]
    assert any("output folder lies inside input" in note for note in run.discovery.notes)
    assert "output folder lies inside input" in "".join(str(cell) for cell in describe_plan(run).columns[1]._cells)


def test_a_folder_listed_twice_counts_once(tmp_path):
    photos = write_photos(tmp_path / "photos", photo_files("astronaut"))
    (tmp_path / "alias").symlink_to(photos)
    recipe = load_recipe(
        generate_recipe(
            tmp_path / "r.yaml",
            photos,
            tmp_path / "O",
            f"input.paths=[{yaml_text(photos)}, {yaml_text(tmp_path / 'alias')}]",
        )
    )
    run = plan_run(recipe, ShardSpec(0, 1))
    assert [source.key for source in run.discovery.sources] == ["astronaut"] and not run.discovery.prefixed_keys


def test_adding_an_input_folder_to_a_one_folder_run_is_a_different_run(tmp_path):
    photos = write_photos(tmp_path / "photos", photo_files("astronaut"))
    more = write_photos(tmp_path / "more", photo_files("coffee"))
    out = tmp_path / "O"
    one = plan_run(load_recipe(generate_recipe(tmp_path / "r.yaml", photos, out)), ShardSpec(0, 1))
    write_run_json(out, {"identity": one.identity})
    two = plan_run(
        load_recipe(
            generate_recipe(tmp_path / "r.yaml", photos, out, f"input.paths=[{yaml_text(photos)}, {yaml_text(more)}]")
        ),
        ShardSpec(0, 1),
    )
    with pytest.raises(OutputConflictError, match="input_keys"):
        check_run_compatible(out, two.identity, overwrite=False)


def test_another_batch_size_is_a_different_run(tmp_path):
    photos = write_photos(tmp_path / "photos", photo_files("astronaut"))
    first = load_recipe(generate_recipe(tmp_path / "a.yaml", photos, tmp_path / "O", "sampling.batch_size=3"))
    write_run_json(tmp_path / "O", {"identity": first.identity()})
    other = load_recipe(generate_recipe(tmp_path / "b.yaml", photos, tmp_path / "O", "sampling.batch_size=5"))
    with pytest.raises(OutputConflictError, match="sampling"):
        check_run_compatible(tmp_path / "O", other.identity(), overwrite=False)


def test_check_warns_when_the_disk_has_less_free_space_than_the_plan_needs(tmp_path):
    photos = write_photos(tmp_path / "photos", photo_files("astronaut", "coffee"))
    run = plan_run(load_recipe(generate_recipe(tmp_path / "r.yaml", photos, tmp_path / "O")), ShardSpec(0, 1))
    assert free_space_warning(run, free_bytes=10**12) is None
    warning = free_space_warning(run, free_bytes=1000)
    assert (
        warning is not None and str(tmp_path / "O") in warning and "6 samples" in warning
    )  # 2 inputs x (rain, mix x 2)
