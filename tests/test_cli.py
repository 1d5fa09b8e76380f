"""The command line as a new user meets it: messages printed verbatim, clear errors for hostile recipes and
arguments (no traceback, exit status 2), `check` for both recipe kinds, and a seeded fuzz of the shipped
recipes through `check`. In-process (typer's CliRunner) to stay fast."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
import yaml
from PIL import Image

from mdsd3_cli import __version__
from mdsd3_cli.cli import app
from mdsd3_cli.generate.plan import ShardSpec
from mdsd3_cli.generate.run import plan_run, run_generate
from mdsd3_cli.model.prompts import PromptCache
from mdsd3_cli.model.sampler import MDSD3Sampler
from mdsd3_cli.model.weights import build_tiny
from mdsd3_cli.pipeline.pipeline import SamplingMemoryError
from mdsd3_cli.recipe.generate import example_recipe_text, load_recipe

from .helpers import EXAMPLE_PHOTOS, REPO, assert_clean_error, mdsd3, recipe_data, write_recipe, yaml_text

PHOTOS = EXAMPLE_PHOTOS
CONFIGS = REPO / "configs"
RECIPE = recipe_data(
    "model.prompt_cache=prompts",
    f"input.paths=[{yaml_text(PHOTOS)}]",
    "sampling={steps: 2, guidance: 3.0, seed: 1, batch_size: 2}",
    "variants.mix={name: mix, classes: {haze: [0.2, 0.8]}}",
)
"""A small generate recipe on the repository's photos, its output and prompt cache beside the recipe file."""


# ------------------------------------------------------------------------------------- failed inputs


def write_inputs(folder: Path) -> dict[str, str]:
    """One photo, two files that are not images by name, and 7 that are by name only; -> failing name: reason."""
    folder.mkdir(parents=True)
    photo = sorted(PHOTOS.iterdir())[0]
    (folder / "good.png").write_bytes(photo.read_bytes())
    (folder / "notes.txt").write_text("not an input")
    (folder / ".DS_Store").write_bytes(b"\0\1Bud1")
    (folder / "a_fake.jpg").write_text("hello")
    jpeg = folder / "b_truncated.jpg"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "c_small.png")
    for index in range(4):
        (folder / f"d_empty{index}.png").write_bytes(b"")
    return {
        "a_fake.jpg": "not an image",
        "b_truncated.jpg": "truncated or corrupt image",
        "c_small.png": "too small: 8x8",
        **{f"d_empty{index}.png": "empty file" for index in range(4)},
    }


def failed_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("failed ")]


@pytest.mark.parametrize("layout", ["folders", "webdataset"])
def test_check_decode_lists_the_inputs_generate_fails_and_generate_names_them(tmp_path, layout):
    inputs = tmp_path / "in"
    failing = write_inputs(inputs)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"input.paths=[{yaml_text(inputs)}]",
        f"output.layout={layout}",
        "variants=[{name: rain, classes: {rain: 1.0}}]",
        base=RECIPE,
    )
    checked = mdsd3("check", "--config", recipe)
    assert checked.exit_code == 0, checked.output
    assert re.search(r"input images\s+│ 8 ", checked.stdout)  # .txt and .DS_Store are not inputs; the rest are

    decoded = mdsd3("check", "--config", recipe, "--decode")
    assert decoded.exit_code == 1, decoded.output
    listed = failed_lines(decoded.stderr)
    assert [line.split(": ", 1)[0] for line in listed] == [f"failed {inputs / name}" for name in failing]
    for line, reason in zip(listed, failing.values()):
        assert line.split(": ", 1)[1].startswith(reason), line
    assert "7 of 8 inputs would fail" in decoded.stderr and "decode inputs: 8/8" in decoded.stderr

    generated = mdsd3("generate", "--config", recipe)
    assert generated.exit_code == 1, generated.output
    assert re.search(r"failed inputs\s+│ 7 ", generated.stdout)
    assert failed_lines(generated.stderr) == listed[:5] + ["failed ... and 2 more"]
    errors_file = tmp_path / "out" / "errors" / "shard-00000-of-00001.jsonl"
    assert f"every failed input and its reason: {errors_file}" in generated.stderr
    recorded = [json.loads(line) for line in errors_file.read_text().splitlines()]
    assert [f"failed {entry['path']}: {entry['reason']}" for entry in recorded] == listed


def test_check_decode_passes_clean_inputs_and_is_for_generate_recipes(tmp_path, train_recipe):
    recipe = write_recipe(tmp_path / "r.yaml", base=RECIPE)
    decoded = mdsd3("check", "--config", recipe, "--decode")
    assert decoded.exit_code == 0, decoded.output
    count = len([path for path in PHOTOS.iterdir() if not path.name.startswith(".")])
    assert f"ok: all {count} inputs decode" in decoded.stderr and failed_lines(decoded.stderr) == []
    assert_clean_error(mdsd3("check", "--config", train_recipe, "--decode"), "--decode checks a generate recipe")
    assert "1 valid but some inputs would fail" in " ".join(mdsd3("check", "--help").stdout.split())


def test_a_piped_check_prints_tables_and_paths_in_full(tmp_path):
    """Off a terminal (a real pipe, as in SLURM logs or CI) nothing is cut to 80 columns ("pai…")."""
    folder = tmp_path / ("a_long_folder_name_" * 6)
    inputs = folder / "inputs"
    write_inputs(inputs)
    recipe = write_recipe(folder / "r.yaml", f"input.paths=[{yaml_text(inputs)}]", base=RECIPE)
    environment = {name: value for name, value in os.environ.items() if name != "COLUMNS"}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO), environment.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "mdsd3_cli", "check", "--config", str(recipe), "--decode"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert f"│ {folder / 'out'} │" in result.stdout and "…" not in result.stdout
    assert f"failed {inputs / 'a_fake.jpg'}: not an image" in result.stderr


# ---------------------------------------------------------------------------------------- guidance <= 1


@pytest.fixture(scope="module")
def unguided(tmp_path_factory) -> Path:
    """`mdsd3 generate` with guidance 1 on one photo: no unconditional branch, so no empty prompt either."""
    folder = tmp_path_factory.mktemp("unguided")
    recipe = write_recipe(folder / "r.yaml", "sampling.guidance=1.0", base=RECIPE)
    result = mdsd3("generate", "--config", recipe, "--limit", "1")
    assert result.exit_code == 0, (result.output, result.exception)
    return folder


def test_guidance_one_generates_without_the_unconditional_prompt(unguided):
    lines = [line for path in (unguided / "out" / "manifest").glob("*.jsonl") for line in path.read_text().splitlines()]
    assert len(lines) == 2
    cache = PromptCache(unguided / "prompts", build_tiny().fingerprint)
    assert cache.missing(["rain", "haze"]) == [] and cache.missing([""]) == [""]


# ------------------------------------------------------------------------------------ verbatim messages


def test_yaml_error_and_paths_with_brackets_are_printed_verbatim(tmp_path):
    folder = tmp_path / "[bold]odd]"
    folder.mkdir()
    broken = folder / "r[1].yaml"
    broken.write_text("model: {base: tiny}\nvariants:\n  - {name: a, classes: [rain\n  - {name: b}\n")
    message = assert_clean_error(mdsd3("check", "--config", broken), str(broken), "classes: [rain", "^")
    assert "invalid YAML" in message

    missing = write_recipe(folder / "r.yaml", 'input.paths=["shots[raw]"]', base=RECIPE)
    assert_clean_error(mdsd3("check", "--config", missing), str(folder / "shots[raw]"))

    named = write_recipe(folder / "n.yaml", base=RECIPE)
    assert_clean_error(
        mdsd3("check", "--config", named, "--set", "variants.0.name='[bold]x y'"),
        "'[bold]x y' is not a plain folder name",
    )


def test_check_prints_values_in_its_plan_verbatim(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        'model.classes=["[bold]", "a]b["]',
        'variants=[{name: v, classes: {"[bold]": 1.0}}]',
        base=RECIPE,
    )
    result = mdsd3("check", "--config", recipe)
    assert result.exit_code == 0, result.output
    assert "[bold], a]b[" in result.stdout


# ----------------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("variants.0.repeats=100000000", "variants.0.repeats: Input should be less than or equal to 1000"),
        ("model.device=cuda:99999999999999999999", "model.device: 'cuda:99999999999999999999' is not a device name"),
        ("model.base=/", "model.base: / is not a diffusers-format SD3 folder"),
    ],
)
def test_check_refuses_what_generate_could_not_run(tmp_path, change, fragment):
    recipe = write_recipe(tmp_path / "r.yaml", change, base=RECIPE)
    assert_clean_error(mdsd3("check", "--config", recipe), f"{recipe}: {fragment}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_recipe_error(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "model.device=cuda:0", base=RECIPE)
    for command in ("check", "generate"):
        assert_clean_error(
            mdsd3(command, "--config", recipe),
            "model.device: 'cuda:0' requested but CUDA is not available on this machine",
        )
    assert not (tmp_path / "out").exists()


def test_hostile_recipe_files(tmp_path):
    assert_clean_error(mdsd3("check", "--config", "/dev/zero"), "/dev/zero: larger than 1024 KiB")
    deep = tmp_path / "deep.yaml"
    deep.write_text("seed: " + "[" * 600 + "]" * 600 + "\n")
    assert_clean_error(mdsd3("check", "--config", deep), f"{deep}: line 1: invalid recipe: nested deeper than")
    os.mkfifo(tmp_path / "pipe")
    recipe = write_recipe(tmp_path / "r.yaml", "input.paths=[pipe]", base=RECIPE)
    assert_clean_error(mdsd3("check", "--config", recipe), "input.paths.0: not a regular file or folder")


def test_set_errors_say_they_came_from_set(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", base=RECIPE)
    assert_clean_error(
        mdsd3("check", "--config", recipe, "--set", "sampling.steps=abc"),
        f"{recipe}: sampling.steps (from --set sampling.steps=abc): Input should be a valid integer",
    )


def test_cpu_out_of_memory_backs_off_then_says_what_to_change(tmp_path, monkeypatch):
    original = MDSD3Sampler.generate
    calls = []

    def cpu_allocator(self, pixels, requests, *args, pad_to=None, **kwargs):
        calls.append(pad_to)
        if (pad_to or 0) > 1:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
        return original(self, pixels, requests, *args, pad_to=pad_to, **kwargs)

    monkeypatch.setattr(MDSD3Sampler, "generate", cpu_allocator)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", "sampling.batch_size=100000", base=RECIPE))
    summary = run_generate(plan_run(recipe, ShardSpec(0, 1), limit=1))
    assert summary.written == 2 and summary.batch_size == 1 and calls[0] == 100000 and calls[-1] == 1

    def always(self, *args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(MDSD3Sampler, "generate", always)
    again = load_recipe(write_recipe(tmp_path / "again.yaml", "output.dir=out2", base=RECIPE))
    with pytest.raises(SamplingMemoryError, match="out of memory on cpu at batch size 1 with 32x32 images"):
        run_generate(plan_run(again, ShardSpec(0, 1), limit=1))


def test_init_on_a_missing_folder_or_a_folder(tmp_path):
    assert_clean_error(mdsd3("init", tmp_path / "nowhere" / "r.yaml"), f"folder {tmp_path / 'nowhere'} does not exist")
    assert_clean_error(mdsd3("init", tmp_path, "--force"), f"{tmp_path} is a folder")


def test_init_template_names_real_commands_and_the_alpha_beta_rule():
    text = example_recipe_text()
    commands = set(typer.main.get_command(app).commands)
    mentioned = set(re.findall(r"`mdsd3 ([a-z-]+)", text))
    assert mentioned and mentioned <= commands, mentioned - commands
    assert "alpha + beta > 1 keeps the degradations strong" in text and "keeps more of the clean image" not in text


# ------------------------------------------------------------------------------------ plain usage


def test_version_and_bare_command():
    version = mdsd3("--version")
    assert version.exit_code == 0 and version.stdout.strip() == f"mdsd3 {__version__}"
    bare = mdsd3()
    assert bare.exit_code == 0 and "Usage" in bare.stdout and "generate" in bare.stdout


def test_check_speaks_of_limit_only_when_given(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", base=RECIPE)
    checked = mdsd3("check", "--config", recipe)
    assert checked.exit_code == 0 and "--limit" not in checked.stdout and "samples in plan" in checked.stdout
    dry = mdsd3("generate", "--config", recipe, "--dry-run", "--limit", "2")
    assert dry.exit_code == 0 and "in plan (--limit 2)" in dry.stdout


def test_every_command_summary_fits_one_line_of_an_80_column_help():
    names = sorted(typer.main.get_command(app).commands)
    shown = mdsd3("--help", env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    start = next(index for index, line in enumerate(lines) if "Commands" in line)
    panel = lines[start + 1 : next(index for index in range(start, len(lines)) if lines[index].startswith("╰"))]
    assert all(len(line) <= 80 for line in lines), lines
    assert sorted(line.split()[1] for line in panel) == names, panel  # one line per command, no continuation


def test_check_plans_the_slurm_array_task_as_generate_does(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", base=RECIPE)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    checked, dry = mdsd3("check", "--config", recipe), mdsd3("generate", "--config", recipe, "--dry-run")
    assert checked.exit_code == 0 and dry.exit_code == 0, (checked.output, dry.output)
    assert "shard-00001-of-00003" in checked.stdout and checked.stdout == dry.stdout  # the same plan table
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")  # not one of 3 tasks: refused as generate refuses it
    assert_clean_error(mdsd3("check", "--config", recipe), "SLURM array task 7")


def test_preview_of_a_missing_folder_and_of_small_images(unguided, tmp_path):
    assert_clean_error(
        mdsd3("preview", "--dataset", tmp_path / "nowhere", "--out", tmp_path / "p.png"),
        f"dataset folder not found: {tmp_path / 'nowhere'}",
    )
    sheet_path = tmp_path / "sheet.png"
    assert mdsd3("preview", "--dataset", unguided / "out", "--out", sheet_path).exit_code == 0
    sheet = np.asarray(Image.open(sheet_path).convert("RGB"))
    cell = 96  # 32 px images: the cell shrinks from 192 to its minimum and the images fill it
    assert sheet.shape[1] == 3 * cell
    first_image = sheet[2 * 18 : 2 * 18 + cell, :cell]
    assert (first_image.reshape(-1, 3) == 255).all(axis=1).mean() < 0.05


def test_info_parameter_counts_add_up(tmp_path):
    result = mdsd3("info", "--config", write_recipe(tmp_path / "r.yaml", base=RECIPE))
    assert result.exit_code == 0, result.output
    counts = dict(re.findall(r"parameters: ([^│]+?)\s*│\s*([\d,]+)", result.stdout))
    numbers = {name: int(value.replace(",", "")) for name, value in counts.items()}
    total = numbers.pop("total")
    assert len(numbers) == 4 and sum(numbers.values()) == total and "Z layers" in numbers


# ------------------------------------------------------------------------------- training recipes


@pytest.fixture(scope="module")
def train_recipe(tmp_path_factory) -> Path:
    """configs/train_tiny.yaml pointed at a few small pairs."""
    folder = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    data = yaml.safe_load((CONFIGS / "train_tiny.yaml").read_text())
    for dataset in data["datasets"]:
        for side in ("clean", "degraded"):
            target = folder / "pairs" / (side if side == "clean" else dataset["name"])
            target.mkdir(parents=True, exist_ok=True)
            for name in ("a", "b"):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(target / f"{name}.png")
            dataset[side] = str(target)
    data["output"]["dir"] = str(folder / "out")
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_check_accepts_training_recipes(train_recipe):
    result = mdsd3("check", "--config", train_recipe)
    assert result.exit_code == 0, result.output
    assert "training plan" in result.stdout and "haze_half: 2 pairs" in result.stdout and "valid" in result.stderr


def test_training_recipe_errors_use_the_generate_wording(train_recipe, tmp_path):
    data = yaml.safe_load(train_recipe.read_text())
    data["train"]["stpes"] = data["train"].pop("steps")
    del data["classes"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    message = assert_clean_error(
        mdsd3("check", "--config", bad),
        f"{bad}: train.stpes: unknown field; did you mean 'steps'?",
        f"{bad}: classes: required field is missing",
    )
    assert "Extra inputs" not in message and "Field required" not in message


# ---------------------------------------------------------------------------------------------- fuzz

HOSTILE_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    1.5,
    10**30,
    1e308,
    -1e-9,
    "",
    "x",
    "nan",
    "[bold]",
    "a]b[",
    "*",
    "/nonexistent",
    "/dev/zero",
    "cuda:99999999999999999999",
    "cuda:0",
    "native",
    [],
    [1, 2, 3],
    [[0.2, 0.5]],
    {},
    {"rain": 2},
    {"x": {"y": 1}},
    "ü" * 300,
    10**8,
]
TEXT_NOISE = list(":[]{}&*!|>'\"\n\t-#%@`,?") + ["\n  ", ": ", "- ", "<<: ", "&a ", "*a "]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            paths += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            paths += _paths(value, (*prefix, index))
    return paths


def _mutate_data(data: dict, rng: random.Random) -> str:
    path = rng.choice(_paths(data)[1:])
    *parents, leaf = path
    node = data
    for part in parents:
        node = node[part]
    action = rng.random()
    if action < 0.55:
        node[leaf] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
    elif action < 0.7 and isinstance(node, dict):
        del node[leaf]
    elif action < 0.85 and isinstance(node, dict):
        node[f"{leaf}{rng.choice('sx_')}"] = node.pop(leaf)  # a misspelled key
    else:
        node[leaf] = "DEEP"
    return yaml.safe_dump(data, sort_keys=False).replace("DEEP", "[" * 200 + "]" * 200)


def _mutate_text(text: str, rng: random.Random) -> str:
    action = rng.random()
    lines = text.splitlines(keepends=True)
    if action < 0.5:
        at = rng.randrange(len(text) + 1)
        return text[:at] + "".join(rng.choice(TEXT_NOISE) for _ in range(rng.randint(1, 4))) + text[at:]
    if action < 0.75 and lines:
        at = rng.randrange(len(lines))
        return "".join(lines[: at + 1] + [lines[at]] + lines[at + 1 :])  # a duplicated line (often a duplicate key)
    if action < 0.9 and lines:
        del lines[rng.randrange(len(lines))]
        return "".join(lines)
    return text[: rng.randrange(len(text) + 1)]


@pytest.fixture(scope="module")
def seed_recipes(train_recipe, tmp_path_factory) -> list[dict]:
    """The shipped recipes with their paths pointed here (SD3 ones at the tiny base)."""
    folder = tmp_path_factory.mktemp("fuzz")
    recipes = []
    for name in ("demo.yaml", "rain_haze.yaml", "multi_degradation.yaml"):
        data = yaml.safe_load((CONFIGS / name).read_text())
        data["model"].update(
            base="tiny", adapter=None, classes=["rain", "haze", "noise"], prompt_cache=str(folder / "prompts")
        )
        data["input"]["paths"] = [str(PHOTOS)]
        data["output"]["dir"] = str(folder / "out")
        recipes.append(data)
    recipes.append(yaml.safe_load(train_recipe.read_text()))
    return recipes


def test_fuzzed_recipes_never_crash_check(seed_recipes, tmp_path):
    rng = random.Random(11)
    outcomes = {0: 0, 2: 0}
    for number in range(300):
        data: dict | None = copy.deepcopy(rng.choice(seed_recipes))
        text = yaml.safe_dump(data, sort_keys=False)
        for _ in range(rng.randint(1, 3)):
            if data and rng.random() < 0.6:
                text = _mutate_data(data, rng)
            else:
                text, data = _mutate_text(text, rng), None
        path = tmp_path / f"fuzz{number:03d}.yaml"
        path.write_text(text)
        result = mdsd3("check", "--config", path)
        assert result.exit_code in outcomes, (text, result.output, result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), (text, repr(result.exception))
        if result.exit_code == 2:
            assert str(path) in result.stderr, (text, result.stderr)
        outcomes[result.exit_code] += 1
    assert outcomes[0] >= 5 and outcomes[2] > 100, outcomes


def test_export_to_an_unknown_format_suggests_the_closest(tmp_path: Path) -> None:
    assert_clean_error(
        mdsd3("export", "--dataset", tmp_path, "--to", "lmbd", tmp_path / "x"),
        "--to lmbd: expected one of webdataset, lmdb, parquet; did you mean 'lmdb'?",
    )
