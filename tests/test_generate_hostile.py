"""Issue 17, generate side: hostile output folders (links and foreign files at tar names, a user's run.json),
stop signals within one image's repeats, one shard count per output, sizes the model cannot take, and recipes
that would expand to huge plans. Tiny preset, in process except where a real process is the point."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from mdsd3_cli.dataset.folders_writer import FoldersWriter
from mdsd3_cli.dataset.manifest import run_folders
from mdsd3_cli.dataset.ownership import clear_outputs, sharding_lock
from mdsd3_cli.dataset.run_record import write_run_json
from mdsd3_cli.generate.plan import ShardSpec
from mdsd3_cli.generate.run import plan_run, run_generate
from mdsd3_cli.recipe.generate import MAX_SAMPLES_PER_INPUT, load_recipe

from .helpers import PHOTOS, assert_clean_error, generate_recipe, mdsd3

PER_TAR = 1
TARS = [f"shard-00000-of-00001-{index:06d}.tar" for index in range(3)]  # 3 keys (x 3 folders), 1 key per tar


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((out / "tars").glob("*.tar"))}


def manifest_lines(out: Path) -> list[str]:
    return [line for path in sorted((out / "manifest").glob("*.jsonl")) for line in path.read_text().splitlines()]


def images(out: Path) -> dict[str, bytes]:
    """Every file under clean/, degraded/ and tars/, by relative path."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for area in ("clean", "degraded", "tars")
        for p in sorted((out / area).rglob("*"))
        if p.is_file()
    }


def one_photo(tiny_photos: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(tiny_photos / PHOTOS["astronaut"], folder / "astronaut.png")
    return folder


@pytest.fixture(scope="module")
def webdataset_reference(tmp_path_factory, tiny_photos) -> Path:
    """One uninterrupted webdataset run (3 keys x 3 folders, 1 key per tar)."""
    root = tmp_path_factory.mktemp("hostile_webdataset")
    overrides = "output.layout=webdataset", f"output.samples_per_tar={PER_TAR}"
    recipe = generate_recipe(root / "recipe.yaml", tiny_photos, root / "out", *overrides)
    assert run_generate(plan_run(load_recipe(recipe), ShardSpec(0, 1))).exit_code == 0
    return root / "out"


def outside_tar(folder: Path) -> Path:
    """A tar outside the dataset holding a record of a variant the recipe does not have."""
    path = folder / "outside.tar"
    record = {
        "key": "coffee",
        "folder": "evil",
        "tar": f"tars/{TARS[1]}",
        "clean_member": "coffee.clean.png",
        "degraded_member": "coffee.evil.degraded.png",
        "json_member": "coffee.json",
    }
    with tarfile.open(path, "w") as archive:
        for name, data in (
            (record["clean_member"], b"x"),
            (record["degraded_member"], b"y"),
            (record["json_member"], json.dumps({"evil": record}).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    "planted", ["link to an outside tar", "not a tar", "another group's tar", "link to this group's own tar"]
)
def test_a_file_at_a_tar_name_that_this_run_did_not_record_is_redone(webdataset_reference, tmp_path, planted):
    out = shutil.copytree(webdataset_reference, tmp_path / "out")
    manifest = out / "manifest" / "shard-00000-of-00001.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(line for line in lines if TARS[1] not in line))  # group 1 not done yet
    target = out / "tars" / TARS[1]
    target.unlink()
    outside = tmp_path / "outside"
    outside.mkdir()
    if planted == "link to an outside tar":
        target.symlink_to(outside_tar(outside))
    elif planted == "not a tar":
        target.write_bytes(b"not a tar at all")
    elif planted == "another group's tar":
        shutil.copy(out / "tars" / TARS[0], target)
    else:
        shutil.copy(webdataset_reference / "tars" / TARS[1], outside / "own.tar")
        target.symlink_to(outside / "own.tar")
    kept = {path.name: path.read_bytes() for path in outside.iterdir()}

    recipe = load_recipe(webdataset_reference.parent / "recipe.yaml", [f"output.dir={out}"])
    summary = run_generate(plan_run(recipe, ShardSpec(0, 1)))

    assert summary.exit_code == 0 and summary.written == 3  # the group (one key, 3 folders) was sampled again
    assert not target.is_symlink() and tar_bytes(out) == tar_bytes(webdataset_reference)
    assert sorted(manifest_lines(out)) == sorted(manifest_lines(webdataset_reference))
    assert {path.name: path.read_bytes() for path in outside.iterdir()} == kept  # nothing written through a link


def test_a_users_run_json_does_not_make_the_folder_mdsd3s(tiny_photos, tmp_path):
    out = tmp_path / "results"
    files = {
        "run.json": b'{"experiment": "baseline", "identity": {}}',
        "manifest/data.json": b'{"files": []}',
        "errors/train.jsonl": b'{"step": 1}\n',
        "clean/astronaut.png": b"user image",
    }
    for relative, data in files.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(data)
    recipe = generate_recipe(tmp_path / "recipe.yaml", one_photo(tiny_photos, tmp_path / "photos"), out)
    assert_clean_error(mdsd3("check", "--config", recipe), "run.json that mdsd3 did not write")
    assert_clean_error(mdsd3("generate", "--config", recipe, "--overwrite"), "run.json that mdsd3 did not write")
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_overwrite_removes_only_what_mdsd3_wrote_and_recorded(tmp_path):
    out = tmp_path / "O"
    with FoldersWriter(out, "shard-00000-of-00001") as writer:
        writer.submit({"key": "a", "folder": "rain"}, *[np.zeros((16, 16, 3), np.uint8)] * 2)
    write_run_json(out, {"identity": {}})
    with open(out / "manifest" / "shard-00000-of-00001.jsonl", "a") as manifest:  # a line naming a user's file
        line = {"key": "n", "folder": "rain", "clean": "notes.txt", "degraded": "errors/x.txt"}
        manifest.write(json.dumps(line) + "\n")
    user = {
        "notes.txt": "mine",
        "errors/x.txt": "mine",
        "manifest/data.json": '{"files": ["notes.txt"]}',
        "errors/train.jsonl": "{}\n",
    }
    for relative, text in user.items():
        (out / relative).write_text(text)
    clear_outputs(out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(user)
    write_run_json(out, {"identity": {}})
    assert json.loads((out / "run.json").read_text())["tool"] == "mdsd3"  # the marker of every new run.json


def test_a_run_json_written_before_the_marker_is_still_mdsd3s(tiny_photos, tmp_path):
    out = tmp_path / "out"
    recipe = generate_recipe(tmp_path / "recipe.yaml", one_photo(tiny_photos, tmp_path / "photos"), out)
    loaded = load_recipe(recipe)
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"identity": loaded.identity(), "recipe": loaded.model_dump(mode="json")}))
    (out / "notes.md").write_text("mine")
    result = mdsd3("check", "--config", recipe)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("layout, photos, repeats", [("folders", 1, 12), ("webdataset", 12, 1)])
def test_sigterm_stops_within_a_batch(tiny_photos, tmp_path, layout, photos, repeats):
    """Folders: within one image's repeats. Webdataset (a key's sample is written whole): within a key or two."""
    folder = one_photo(tiny_photos, tmp_path / "photos")
    for copy in range(1, photos):
        shutil.copy(folder / "astronaut.png", folder / f"astronaut{copy:02d}.png")

    def recipe_for(out: Path) -> Path:
        path = generate_recipe(
            tmp_path / f"{out.name}.yaml", folder, out, f"output.layout={layout}", f"output.samples_per_tar={PER_TAR}"
        )
        data = yaml.safe_load(path.read_text())
        data["sampling"].update(steps=1, guidance=1.0, batch_size=1)
        data["variants"] = [{"name": "rain", "classes": {"rain": [0.2, 0.9]}, "repeats": repeats}]
        path.write_text(yaml.safe_dump(data))
        return path

    out = tmp_path / "stopped"
    recipe = recipe_for(out)
    process = subprocess.Popen(
        [sys.executable, "-m", "mdsd3_cli", "generate", "--config", str(recipe)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while (
        time.monotonic() < deadline
        and process.poll() is None
        and not ((out / "manifest").is_dir() and manifest_lines(out))
    ):
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    assert 1 <= len(manifest_lines(out)) <= 4  # stopped within a batch or two, not after all 12

    summary = run_generate(plan_run(load_recipe(recipe), ShardSpec(0, 1)))
    assert summary.exit_code == 0 and summary.already_done + summary.written == 12
    uninterrupted = tmp_path / "uninterrupted"
    assert run_generate(plan_run(load_recipe(recipe_for(uninterrupted)), ShardSpec(0, 1))).exit_code == 0
    assert images(out) and images(out) == images(uninterrupted)
    lines = manifest_lines(out)
    assert sorted(lines) == sorted(manifest_lines(uninterrupted)) and len(set(lines)) == len(lines) == 12


def test_one_output_takes_one_shard_count_at_a_time(tiny_photos, tmp_path):
    out = tmp_path / "out"
    recipe = generate_recipe(tmp_path / "recipe.yaml", one_photo(tiny_photos, tmp_path / "photos"), out)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from mdsd3_cli.dataset.ownership import sharding_lock\n"
            f"with sharding_lock({str(out)!r}, 2):\n    print('locked', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = mdsd3("generate", "--config", recipe, "--shard-index", 0, "--num-shards", 3)
        assert_clean_error(refused, "with 2 shards (this run has 3)")
        assert not (out / "manifest").exists()
        same_count = mdsd3("generate", "--config", recipe, "--shard-index", 1, "--num-shards", 2)
        assert same_count.exit_code == 0, same_count.output  # shard 1 of 2 owns no photo: nothing to sample
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with sharding_lock(out, 3):  # a killed holder leaves no stale lock
        pass


@pytest.mark.parametrize(
    "base, overrides, limit",
    [
        ("mini", ["input.size=512"], 384),
        ("tiny", ["input.size=2048"], 1536),
        ("tiny", ["input.resize=native", "input.max_side=2000"], 1536),
    ],
)
def test_check_refuses_a_size_the_model_cannot_take(tiny_photos, tmp_path, base, overrides, limit, monkeypatch):
    recipe = generate_recipe(tmp_path / "recipe.yaml", one_photo(tiny_photos, tmp_path / "photos"), tmp_path / "out")
    model = ["model.base=mini", "model.adapter=mini", "model.classes=null"] if base == "mini" else []
    monkeypatch.setattr("mdsd3_cli.model.weights.load_base", lambda *a, **k: pytest.fail("a model was loaded"))
    field = "input.max_side" if "input.resize=native" in overrides else "input.size"
    for command in ("check", "generate"):
        sets = [arg for value in [*model, *overrides] for arg in ("--set", value)]
        result = mdsd3(command, "--config", recipe, *sets)
        assert_clean_error(result, field, f"at most {limit} pixels")


def test_a_control_character_in_a_recipe_is_named_with_its_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  base: tiny\x01\n")
    assert_clean_error(mdsd3("check", "--config", recipe), f"{recipe}: line 2: column 13: character U+0001")


def test_huge_repeats_are_counted_not_expanded(tiny_photos, tmp_path, monkeypatch):
    recipe = generate_recipe(tmp_path / "recipe.yaml", tiny_photos, tmp_path / "out")  # 3 photos
    data = yaml.safe_load(recipe.read_text())
    data["variants"] = [{"name": f"v{index}", "classes": {"rain": 0.5}, "repeats": 1000} for index in range(1500)]
    recipe.write_text(yaml.safe_dump(data))
    assert_clean_error(
        mdsd3("check", "--config", recipe),
        "variants",
        "1,500,000 samples per input image",
        f"at most {MAX_SAMPLES_PER_INPUT:,}",
    )

    data["variants"] = data["variants"][: MAX_SAMPLES_PER_INPUT // 1000]  # exactly the limit is fine
    recipe.write_text(yaml.safe_dump(data))
    monkeypatch.setattr("mdsd3_cli.generate.run.build_plan", lambda *a: pytest.fail("check built the plan"))
    result = mdsd3("check", "--config", recipe)
    assert result.exit_code == 0, result.output
    counts = dict(re.findall(r"│ (samples in plan|samples in this shard|to do)\s+│ (\d+)", result.stdout))
    assert counts == {"samples in plan": "30000", "samples in this shard": "30000", "to do": "30000"}
    run = plan_run(load_recipe(recipe), ShardSpec(1, 3))
    assert (run.samples_in_plan, run.samples_in_shard) == (3 * MAX_SAMPLES_PER_INPUT, MAX_SAMPLES_PER_INPUT)

    info = {"recipe": {"variants": [{"name": "rain", "repeats": 10**9}]}}
    with pytest.raises(ValueError, match="repeats"):  # a run.json's repeats are checked before any folder is named
        run_folders(info)
