"""`mdsd3 generate` end to end on real photos with the tiny preset: layout, manifest, bad inputs, kills and
resumes, shards sharing one output folder."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from mdsd3_cli.dataset.run_record import OutputConflictError
from mdsd3_cli.dataset.verify import verify_dataset
from mdsd3_cli.generate.plan import ShardSpec
from mdsd3_cli.generate.run import plan_run, run_generate
from mdsd3_cli.model.sampler import MDSD3Sampler
from mdsd3_cli.pipeline.pipeline import MDSD3Pipeline
from mdsd3_cli.recipe.generate import load_recipe
from mdsd3_cli.util.images import load_image

from .helpers import (
    dataset_files,
    generate_recipe,
    manifest_lines,
    mdsd3,
    photo_files,
    recipe_data,
    write_photos,
    yaml_text,
)

PHOTOS = photo_files("astronaut", "coffee", "chelsea", "rocket", "camera", "cat")
E2E_RECIPE = recipe_data(
    "input.size=64",
    "sampling={steps: 3, guidance: 3.0, alpha: 1.0, beta: 0.3, seed: 7, batch_size: 3}",
    "variants.mix={name: mix, classes: {haze: [0.2, 0.8], noise: 0.5}}",
)
"""The tiny preset at 64 px, 3 steps: 2 samples per input (rain, mix)."""


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"), PHOTOS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, photos) -> Path:
    """One uninterrupted CLI run: the dataset every interrupted run must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    recipe = generate_recipe(root / "recipe.yaml", photos, root / "out", base=E2E_RECIPE)
    result = mdsd3("generate", "--config", str(recipe), check=True)
    assert "written now" in result.stdout and "12" in result.stdout
    return root / "out"


def test_cli_writes_the_paired_dataset(reference, photos):
    files = dataset_files(reference)
    assert sorted(files) == sorted(
        [f"clean/{n}.png" for n in PHOTOS] + [f"degraded/{v}/{n}.png" for v in ("rain", "mix") for n in PHOTOS]
    )
    records = [json.loads(line) for line in manifest_lines(reference)]
    assert len(records) == 12 and len({(r["key"], r["folder"]) for r in records}) == 12
    for record in records:
        for field in (
            "key",
            "source",
            "clean",
            "degraded",
            "variant",
            "ratios",
            "alpha",
            "beta",
            "steps",
            "guidance",
            "seed",
            "size",
            "crop_box",
            "base_fingerprint",
            "adapter_fingerprint",
            "mdsd3_version",
        ):
            assert field in record, field
        assert record["size"] == [64, 64] and record["steps"] == 3 and record["beta"] == 0.3
        clean = np.asarray(Image.open(reference / record["clean"]))
        degraded = np.asarray(Image.open(reference / record["degraded"]))
        assert clean.shape == degraded.shape == (64, 64, 3)
        expected = load_image(record["source"], 64, "center_crop").pixels
        np.testing.assert_array_equal(clean, expected)
        if record["variant"] == "mix":
            assert 0.2 <= record["ratios"]["haze"] <= 0.8 and record["ratios"]["noise"] == 0.5
    run = json.loads((reference / "run.json").read_text())
    assert run["classes"] == ["rain", "haze", "noise"] and run["identity"]["sampling"]["steps"] == 3
    assert not leftovers(reference) and not (reference / "errors" / "shard-00000-of-00001.jsonl").read_text()


def test_clean_images_are_exactly_what_the_model_was_given(tmp_path, photos, monkeypatch):
    given = []
    original = MDSD3Sampler.generate

    def spy(self, pixels, requests, *args, **kwargs):
        given.extend(zip([r.seed for r in requests], pixels.numpy().copy()))
        return original(self, pixels, requests, *args, **kwargs)

    monkeypatch.setattr(MDSD3Sampler, "generate", spy)
    recipe = load_recipe(
        generate_recipe(
            tmp_path / "r.yaml",
            photos,
            tmp_path / "out",
            "input.resize=native",
            f"input.paths=[{yaml_text(photos / 'coffee.png')}, {yaml_text(photos / 'camera.png')}]",
            "sampling.steps=1",  # what the model is given does not depend on what it does with it
            "sampling.guidance=1.0",
            base=E2E_RECIPE,
        )
    )
    summary = run_generate(plan_run(recipe, ShardSpec(0, 1)))
    assert summary.written == 4 and summary.exit_code == 0
    records = {r["seed"]: r for r in map(json.loads, manifest_lines(tmp_path / "out"))}
    for seed, pixels in given:
        clean = np.asarray(Image.open(tmp_path / "out" / records[seed]["clean"]))
        np.testing.assert_array_equal(clean, pixels)
        assert np.asarray(Image.open(tmp_path / "out" / records[seed]["degraded"])).shape == pixels.shape
    assert {tuple(p.shape) for _, p in given} == {(400, 592, 3), (512, 512, 3)}  # native: cropped to x16


def test_rerun_resumes_and_changes_nothing(reference, tmp_path, photos):
    before = dataset_files(reference)
    lines = manifest_lines(reference)
    recipe = generate_recipe(tmp_path / "again.yaml", photos, reference, base=E2E_RECIPE)
    result = mdsd3("generate", "--config", str(recipe), check=True)
    assert "already done (resumed) │ 12" in result.stdout
    assert dataset_files(reference) == before and manifest_lines(reference) == lines


def test_resuming_with_another_batch_size_is_refused(reference, tmp_path, photos):
    """The batch size changes the last bits of CPU results, so it is part of the run's identity."""
    recipe = generate_recipe(tmp_path / "r.yaml", photos, reference, "sampling.batch_size=5", base=E2E_RECIPE)
    result = mdsd3("generate", "--config", str(recipe))
    assert result.exit_code == 2 and "different run (sampling.batch_size: 3 → 5; its run.json" in result.stderr
    for command in (["check"], ["generate", "--dry-run"]):  # say it before the run, the same way
        predicted = mdsd3(*command, "--config", str(recipe))
        assert predicted.exit_code == 2 and "different run (sampling.batch_size: 3 → 5;" in predicted.stderr


def test_dry_run_refuses_a_foreign_folder_as_check_and_generate_do(tmp_path, photos):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    recipe = generate_recipe(tmp_path / "r.yaml", photos, out, base=E2E_RECIPE)
    for command in (["check"], ["generate", "--dry-run"], ["generate"]):
        result = mdsd3(*command, "--config", str(recipe))
        assert result.exit_code == 2 and "so mdsd3 did not make it" in result.stderr, (command, result.stderr)
    assert [path.name for path in out.iterdir()] == ["todo.txt"]


def test_other_recipe_into_same_folder_is_refused(reference, tmp_path, photos):
    recipe = generate_recipe(tmp_path / "r.yaml", photos, reference, "sampling.steps=4", base=E2E_RECIPE)
    result = mdsd3("generate", "--config", str(recipe))
    assert result.exit_code == 2 and "different run" in result.stderr and "sampling" in result.stderr


def make_bad_input_folder(folder: Path) -> tuple[Path, list[str], list[str]]:
    """Odd and broken files: returns the folder, the keys that must work and the keys that must fail."""
    folder.mkdir(parents=True)
    photo = data.astronaut()[::4, ::4]
    jpeg = folder / "good_photo.jpg"
    Image.fromarray(photo).save(jpeg, quality=90)
    (folder / "truncated.jpg").write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    Image.new("RGB", (1, 1), "red").save(folder / "tiny.png")
    Image.fromarray(data.camera().astype(np.uint16) * 257).save(folder / "sixteen_bit.png")
    Image.fromarray(photo).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(photo).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(photo).convert("P").save(folder / "palette.gif")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    Image.fromarray(photo[:, :100]).save(folder / "rotated.jpg", exif=exif)
    Image.new("L", (2000, 2000)).save(folder / "bomb.png")  # 4 MP > max_pixels (3 MP) of the recipe below
    good = ["good_photo", "sixteen_bit", "cmyk", "rgba", "palette", "rotated"]
    bad = ["truncated", "empty", "text", "tiny", "bomb"]
    return folder, good, bad


def test_bad_inputs_are_recorded_and_the_run_completes(tmp_path):
    folder, good, bad = make_bad_input_folder(tmp_path / "inputs")
    recipe = generate_recipe(
        tmp_path / "r.yaml",
        folder,
        tmp_path / "out",
        "input.max_pixels=3000000",
        "variants=[{name: rain, classes: {rain: 1.0}}]",
        "sampling.steps=1",
        base=E2E_RECIPE,
    )
    result = mdsd3("generate", "--config", str(recipe))
    assert result.exit_code == 1, result.stderr
    out = tmp_path / "out"
    assert sorted(p.stem for p in (out / "degraded" / "rain").iterdir()) == sorted(good)
    errors = [json.loads(line) for line in (out / "errors" / "shard-00000-of-00001.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in errors) == sorted(bad)
    assert all(e["reason"] for e in errors)
    assert re.search(rf"failed inputs\s+│ {len(bad)} ", result.stdout)


@pytest.mark.parametrize(
    "how, after_lines",
    [(signal.SIGKILL, 0), (signal.SIGKILL, 7), (signal.SIGTERM, 2), (signal.SIGINT, 5)],  # before / within a batch
)
def test_killed_then_rerun_gives_the_uninterrupted_dataset(reference, tmp_path, photos, how, after_lines):
    out = tmp_path / "out"
    recipe = generate_recipe(tmp_path / "r.yaml", photos, out, base=E2E_RECIPE)
    process = subprocess.Popen(
        [sys.executable, "-m", "mdsd3_cli", "generate", "--config", str(recipe)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        done = len(manifest_lines(out)) if (out / "manifest").is_dir() else -1
        if done >= after_lines:
            break
        time.sleep(0.02)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=120)
    if how != signal.SIGKILL and process.returncode != 0:
        assert process.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[how], stderr
    mdsd3("generate", "--config", str(recipe), check=True)
    assert dataset_files(out) == dataset_files(reference)
    lines = manifest_lines(out)
    assert sorted(lines) == sorted(manifest_lines(reference)) and len(set(lines)) == len(lines)
    assert not leftovers(out)


def test_two_shard_processes_share_one_output_folder(reference, tmp_path, photos):
    out = tmp_path / "out"
    recipe = generate_recipe(tmp_path / "r.yaml", photos, out, base=E2E_RECIPE)
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mdsd3_cli",
                "generate",
                "--config",
                str(recipe),
                "--shard-index",
                str(i),
                "--num-shards",
                "2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    for process in processes:
        process.communicate(timeout=300)
        assert process.returncode == 0
    assert sorted(p.name for p in (out / "manifest").iterdir()) == [  # each shard's plan, finished marker, records
        f"shard-0000{index}-of-00002.{suffix}" for index in (0, 1) for suffix in ("finished.json", "jsonl", "plan.json")
    ]
    assert dataset_files(out) == dataset_files(reference)
    assert sorted(manifest_lines(out)) == sorted(manifest_lines(reference))


def test_torchrun_ranks_write_their_shards(reference, tmp_path, photos):
    """A real `torchrun --nproc-per-node 2 -m mdsd3_cli generate` (CPU): each rank takes its own shard."""
    out = tmp_path / "out"
    recipe = generate_recipe(tmp_path / "r.yaml", photos, out, base=E2E_RECIPE)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "-m",
            "mdsd3_cli",
            "generate",
            "--config",
            str(recipe),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "manifest").iterdir()) == [  # each shard's plan, finished marker, records
        f"shard-0000{index}-of-00002.{suffix}" for index in (0, 1) for suffix in ("finished.json", "jsonl", "plan.json")
    ]
    assert dataset_files(out) == dataset_files(reference)


def test_dry_run_and_check_load_no_model(tmp_path, photos):
    recipe = generate_recipe(tmp_path / "r.yaml", photos, tmp_path / "out", base=E2E_RECIPE)
    dry = mdsd3("generate", "--config", str(recipe), "--dry-run", "--limit", "2", check=True)
    assert "samples in plan" in dry.stdout and "│ 4" in dry.stdout
    assert not (tmp_path / "out").exists()
    checked = mdsd3("check", "--config", str(recipe), check=True)
    assert "to do" in checked.stdout and "valid" in checked.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, field",
    [
        ("sampling.steps=0", "sampling.steps"),
        ("sampling.alpha=0", "sampling.alpha"),
        ("sampling.beta=-0.1", "sampling.beta"),
        ("input.size=100", "input.size"),
        ("variants=[{name: ../up, classes: {rain: 1.0}}]", "variants.0.name"),
        ("variants=[{name: a, classes: {snow: 1.0}}]", "variants.0.classes"),
        ("variants=[{name: a, classes: {rain: 1.5}}]", "variants.0.classes.rain"),
        ("sampling.colour=1", "sampling.colour"),
        ("model.adapter=/nonexistent/adapter", "model.adapter"),
    ],
)
def test_bad_recipe_names_file_and_field_and_loads_nothing(tmp_path, photos, change, field):
    recipe = generate_recipe(tmp_path / "bad.yaml", photos, tmp_path / "out", change, base=E2E_RECIPE)
    result = mdsd3("generate", "--config", str(recipe))
    assert result.exit_code == 2
    assert "bad.yaml" in result.stderr and field in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_init_writes_a_recipe_that_check_accepts(tmp_path, photos):
    target = tmp_path / "recipe.yaml"
    mdsd3("init", str(target), check=True)
    assert mdsd3("init", str(target)).exit_code == 2  # never overwrites silently
    text = target.read_text()
    assert text.lstrip().startswith("#")
    (tmp_path / "photos").symlink_to(photos)
    result = mdsd3("check", "--config", str(target), "--set", f"output.dir={tmp_path / 'out'}")
    assert result.exit_code == 0, result.stderr


def test_preview_contact_sheet(reference, tmp_path):
    sheet = tmp_path / "grid.png"
    mdsd3("preview", "--dataset", str(reference), "--n", "3", "--out", str(sheet), "--cell", "64", check=True)
    image = Image.open(sheet)
    assert image.size[0] == 64 * 3 and image.size[1] == 18 + 3 * (64 + 18)  # header, then 3 rows of clean + 2 variants


def test_info_and_encode_prompts(tmp_path, photos):
    recipe = generate_recipe(
        tmp_path / "r.yaml",
        photos,
        tmp_path / "out",
        f"model.prompt_cache={yaml_text(tmp_path / 'pc')}",
        base=E2E_RECIPE,
    )
    encoded = mdsd3("encode-prompts", "--config", str(recipe), check=True)
    assert "9 prompts cached" in encoded.stderr
    assert len(list((tmp_path / "pc").rglob("*.safetensors"))) == 9
    info = mdsd3("info", "--config", str(recipe), check=True)
    assert "class rain" in info.stdout and "heads 0-1" in info.stdout and "Z layers" in info.stdout


@pytest.mark.slow
def test_slurm_array_job_produces_the_single_process_dataset(reference, tmp_path, photos, slurm_cluster):
    """A real 3-task array job (one-node cluster) through scripts/slurm_generate.sbatch."""
    out = tmp_path / "out"
    recipe = generate_recipe(tmp_path / "r.yaml", photos, out, base=E2E_RECIPE)
    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm_generate.sbatch"
    result = slurm_cluster.submit_array(
        script,
        array="0-2",
        args=[str(recipe)],
        cwd=tmp_path,
        timeout=600,
        env={"MDSD3_PYTHON": sys.executable, "MDSD3_PROMPT_CACHE": os.environ["MDSD3_PROMPT_CACHE"]},
    )
    assert result.ok, result.report()
    assert sorted(p.name for p in (out / "manifest").iterdir()) == sorted(  # each shard's records, plan, marker
        f"shard-0000{i}-of-00003.{suffix}" for i in range(3) for suffix in ("jsonl", "plan.json", "finished.json")
    )
    assert verify_dataset(out).ok
    assert dataset_files(out) == dataset_files(reference)
    assert sorted(manifest_lines(out)) == sorted(manifest_lines(reference))


@pytest.mark.parametrize("name", ["demo.yaml", "rain_haze.yaml", "multi_degradation.yaml"])
def test_shipped_recipes_are_valid(name, tmp_path, photos):
    """The configs in configs/ follow the schema; the SD3 ones are checked with their paths pointed at tiny."""
    path = Path(__file__).resolve().parents[1] / "configs" / name
    overrides = (
        []
        if name == "demo.yaml"
        else ["model.base=tiny", "model.adapter=null", "model.classes=[rain, haze, noise]", f"input.paths=[{photos}]"]
    )
    recipe = load_recipe(path, [*overrides, f"output.dir={tmp_path / 'out'}"])
    expected = ["rain", "haze", "noise", "low_light"] if name == "demo.yaml" else ["rain", "haze", "noise"]
    assert recipe.variants and recipe.classes() == expected


def test_out_of_memory_halves_the_batch_and_finishes(tmp_path, photos, monkeypatch):
    import torch  # noqa: PLC0415

    calls = []
    original = MDSD3Sampler.generate

    def tight_memory(self, pixels, requests, *args, pad_to=None, **kwargs):
        calls.append((len(requests), pad_to))
        if max(len(requests), pad_to or 0) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, pixels, requests, *args, pad_to=pad_to, **kwargs)

    monkeypatch.setattr(MDSD3Sampler, "generate", tight_memory)
    recipe = load_recipe(
        generate_recipe(
            tmp_path / "r.yaml",
            photos,
            tmp_path / "out",
            "sampling.batch_size=4",
            "input.size=32",  # the back-off is about batch sizes, not pixels
            "sampling.steps=1",
            base=E2E_RECIPE,
        )
    )
    summary = run_generate(plan_run(recipe, ShardSpec(0, 1)))
    assert summary.written == 12 and summary.batch_size == 1 and summary.exit_code == 0
    assert calls[0] == (4, 4) and (2, 2) in calls and calls[-1] == (1, 1)
    assert len(manifest_lines(tmp_path / "out")) == 12


def test_a_finished_shard_loads_no_model(tmp_path, photos, monkeypatch):
    recipe = load_recipe(generate_recipe(tmp_path / "r.yaml", photos, tmp_path / "out", base=E2E_RECIPE))
    first = run_generate(plan_run(recipe, ShardSpec(0, 1), limit=1))
    assert first.written == 2

    def no_model(*args, **kwargs):
        raise AssertionError("a shard with nothing to do must not load the model")

    monkeypatch.setattr(MDSD3Pipeline, "from_recipe", no_model)
    again = run_generate(plan_run(recipe, ShardSpec(0, 1), limit=1))
    assert again.written == 0 and again.already_done == 2 and again.exit_code == 0


def test_overwrite_redoes_the_run_and_keeps_unrelated_files(tmp_path, photos):
    out = tmp_path / "out"
    first = load_recipe(generate_recipe(tmp_path / "a.yaml", photos, out, base=E2E_RECIPE))
    run_generate(plan_run(first, ShardSpec(0, 1), limit=1))
    (out / "notes.txt").write_text("mine")
    changed = load_recipe(generate_recipe(tmp_path / "b.yaml", photos, out, "sampling.steps=2", base=E2E_RECIPE))
    with pytest.raises(OutputConflictError, match="different run"):
        run_generate(plan_run(changed, ShardSpec(0, 1), limit=1))
    with pytest.raises(ValueError, match="cannot be combined with shards"):
        run_generate(plan_run(changed, ShardSpec(0, 2), limit=1), overwrite=True)
    summary = run_generate(plan_run(changed, ShardSpec(0, 1), limit=1), overwrite=True)
    assert summary.written == 2 and summary.already_done == 0
    assert {json.loads(line)["steps"] for line in manifest_lines(out)} == {2}
    assert json.loads((out / "run.json").read_text())["identity"]["sampling"]["steps"] == 2
    assert (out / "notes.txt").read_text() == "mine"
