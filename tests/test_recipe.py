"""Recipe loading: schema rules, error messages naming file and field, overrides, paths, identity."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml

from mdsd3_cli.model.adapter import WEIGHTS_NAME, AdapterConfig, write_adapter_config
from mdsd3_cli.recipe.generate import (
    InputSection,
    ModelSection,
    OutputSection,
    RecipeError,
    SamplingSection,
    Variant,
    example_recipe_text,
    load_recipe,
)

from .helpers import recipe_data, yaml_text

VALID: dict[str, Any] = {
    "model": {"base": "tiny", "classes": ["rain", "haze", "noise"]},
    "input": {"paths": ["photos/"]},
    "output": {"dir": "out"},
    "sampling": {"steps": 4, "guidance": 7.0, "seed": 1, "batch_size": 2},
    "variants": [
        {"name": "rain_haze", "classes": {"rain": 1.0, "haze": 1.0}},
        {"name": "mix", "classes": {"rain": [0.3, 1.0], "haze": [0.0, 0.6]}, "repeats": 2, "alpha": 0.9, "beta": 0.4},
    ],
}


def write_recipe(folder: Path, data: Any) -> Path:
    """Write a recipe (and the photos/ folder it names) into `folder`."""
    (folder / "photos").mkdir(exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def with_change(dotted: str, value: Any) -> dict[str, Any]:
    """A copy of VALID with one field set as `--set dotted=value` sets it (a `...` value deletes it)."""
    if value is not ...:
        return recipe_data(f"{dotted}={yaml_text(value)}", base=VALID)
    data = copy.deepcopy(VALID)
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    del node[int(last) if isinstance(node, list) else last]
    return data


def make_adapter(folder: Path, classes: list[str], weights: bool = True) -> Path:
    write_adapter_config(folder, AdapterConfig.fresh(classes, "fingerprint", {"num_attention_heads": 6}))
    if weights:
        (folder / WEIGHTS_NAME).write_bytes(b"")
    return folder


def assert_error(path: Path, field: str, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, overrides)
    message = str(caught.value)
    assert f"{path}: {field}: " in message, message
    return message


def test_valid_recipe_loads_with_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, VALID))
    assert recipe.classes() == ["rain", "haze", "noise"]
    assert recipe.sampling.alpha == 1.0 and recipe.input.size == 512 and recipe.output.format == "png"
    assert recipe.variants[1].classes == {"rain": [0.3, 1.0], "haze": [0.0, 0.6]}
    assert recipe.variant_alpha(recipe.variants[0]) == 1.0 and recipe.variant_alpha(recipe.variants[1]) == 0.9
    assert recipe.variant_beta(recipe.variants[0]) == 0.0 and recipe.variant_beta(recipe.variants[1]) == 0.4
    assert recipe.source_path == tmp_path / "recipe.yaml"
    assert "_source_path" not in recipe.model_dump()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sampling.stepz", 3),  # unknown key in a section
        ("extra_section", {}),  # unknown top-level key
        ("variants.0.ratio", 1.0),  # unknown key in a variant
        ("sampling.steps", "many"),  # wrong type
        ("sampling.steps", 2.5),
        ("input.recursive", "yes"),
        ("model.compile", 1),
        ("variants.0.classes.rain", True),
        ("sampling.guidance", float("nan")),
        ("sampling.beta", float("inf")),
        ("sampling.steps", 0),  # steps < 1
        ("sampling.guidance", -0.5),  # guidance < 0
        ("sampling.alpha", 0.0),  # alpha <= 0
        ("variants.1.alpha", -1.0),
        ("sampling.beta", -0.1),  # beta < 0
        ("variants.1.beta", -0.1),
        ("sampling.batch_size", 0),  # batch_size < 1
        ("sampling.grid_shifts", 3),  # not 1, 2 or 4
        ("input.size", 500),  # not a multiple of 16
        ("input.size", 0),
        ("input.resize", "stretch"),
        ("input.paths", []),
        ("output.format", "tiff"),
        ("output.quality", 0),
        ("output.png_compress_level", 10),
        ("model.dtype", "float64"),
        ("model.device", "gpu"),
        ("model.classes", ["rain", "rain"]),
        ("model.classes", ["clean"]),
        ("model.base", ...),  # required field
        ("variants.0.classes.rain", 1.5),  # ratio outside [0, 1]
        ("variants.0.classes.rain", -0.1),
        ("variants.1.classes.rain", [0.2, 1.2]),
        ("variants.1.classes.rain", [0.8, 0.2]),  # range lo > hi
        ("variants.1.classes.rain", [0.1, 0.2, 0.3]),
        ("variants.1.repeats", 0),
        ("variants.0.name", "../up"),  # not a plain folder name
        ("variants.0.name", "."),
        ("variants.0.name", ".."),
        ("variants.0.name", "has space"),
        ("variants.0.name", "a/b"),
        ("variants.0.name", "x" * 101),
        ("variants", []),  # at least one variant
    ],
)
def test_schema_rules_name_file_and_field(tmp_path: Path, field: str, value: Any) -> None:
    assert_error(write_recipe(tmp_path, with_change(field, value)), field)


def test_name_of_exactly_100_characters_is_accepted(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, with_change("variants.0.name", "x" * 100)))
    assert recipe.variants[0].folder(1) == "x" * 100


def test_unknown_class_in_variant(tmp_path: Path) -> None:
    message = assert_error(
        write_recipe(tmp_path, with_change("variants.1.classes.snow", 0.5)), "variants.1.classes.snow"
    )
    assert "'snow'" in message and "rain" in message


def test_duplicate_variant_names(tmp_path: Path) -> None:
    data = with_change("variants.1.name", "rain_haze")
    data["variants"][1]["repeats"] = 1
    assert_error(write_recipe(tmp_path, data), "variants.1.name")


def test_duplicate_variant_names_with_different_repeats(tmp_path: Path) -> None:
    data = with_change("variants.1.name", "rain_haze")
    message = assert_error(write_recipe(tmp_path, data), "variants.1.name")
    assert "collides" not in message


def test_variant_folders_that_collide(tmp_path: Path) -> None:
    data = with_change("variants.0.name", "mix_r2")
    message = assert_error(write_recipe(tmp_path, data), "variants.1")
    assert "'mix_r2'" in message


def test_variant_folders_follow_repeats(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, VALID))
    assert recipe.variants[0].folders() == ["rain_haze"]
    assert recipe.variants[1].folders() == ["mix_r1", "mix_r2"]
    with pytest.raises(ValueError):
        recipe.variants[1].folder(3)


def test_missing_base_folder(tmp_path: Path) -> None:
    message = assert_error(write_recipe(tmp_path, with_change("model.base", "models/sd3")), "model.base")
    assert str(tmp_path / "models" / "sd3") in message


def make_sd3_layout(root: Path) -> Path:
    """The config files a diffusers SD3 folder has (no weights: nothing here loads them)."""
    for sub, name in (("transformer", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        (root / sub).mkdir(parents=True)
        (root / sub / name).write_text("{}")
    return root


def test_existing_base_folder_resolves_against_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_sd3_layout(tmp_path / "models" / "sd3")
    path = write_recipe(tmp_path, with_change("model.base", "models/sd3"))
    monkeypatch.chdir("/")
    assert load_recipe(path).base_dir() == tmp_path / "models" / "sd3"


@pytest.mark.parametrize("base", ["/", "models/half"])
def test_base_folder_without_the_sd3_layout_is_refused(tmp_path: Path, base: str) -> None:
    (make_sd3_layout(tmp_path / "models" / "half") / "vae" / "config.json").unlink()
    message = assert_error(write_recipe(tmp_path, with_change("model.base", base)), "model.base")
    assert "not a diffusers-format SD3 folder" in message and "vae/config.json" in message


def test_missing_input_path(tmp_path: Path) -> None:
    assert_error(write_recipe(tmp_path, with_change("input.paths", ["photos/", "nowhere/"])), "input.paths.1")


def test_input_globs_are_not_checked_and_paths_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_recipe(tmp_path, with_change("input.paths", ["photos/", "more/*.jpg", "/abs/list.txt*"]))
    monkeypatch.chdir("/")
    recipe = load_recipe(path)
    assert recipe.input_paths() == [str(tmp_path / "photos"), str(tmp_path / "more" / "*.jpg"), "/abs/list.txt*"]
    assert recipe.output_dir() == tmp_path / "out"


def test_classes_required_without_adapter(tmp_path: Path) -> None:
    assert_error(write_recipe(tmp_path, with_change("model.classes", ...)), "model.classes")


def test_missing_adapter(tmp_path: Path) -> None:
    assert_error(write_recipe(tmp_path, with_change("model.adapter", "adapters/none")), "model.adapter")


def test_adapter_without_config_or_weights(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_error(write_recipe(tmp_path, with_change("model.adapter", "empty")), "model.adapter")
    make_adapter(tmp_path / "noweights", ["rain", "haze", "noise"], weights=False)
    assert_error(write_recipe(tmp_path, with_change("model.adapter", "noweights")), "model.adapter")


def test_corrupt_adapter_config(tmp_path: Path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    assert_error(write_recipe(tmp_path, with_change("model.adapter", "bad")), "model.adapter")


def test_adapter_classes_are_used(tmp_path: Path) -> None:
    make_adapter(tmp_path / "adapter", ["rain", "haze", "noise", "snow"])
    data = with_change("model.adapter", "adapter")
    del data["model"]["classes"]
    data["variants"][0]["classes"]["snow"] = 0.5
    recipe = load_recipe(write_recipe(tmp_path, data))
    assert recipe.classes() == ["rain", "haze", "noise", "snow"]
    assert recipe.adapter_dir() == tmp_path / "adapter"


def test_adapter_classes_check_variants(tmp_path: Path) -> None:
    make_adapter(tmp_path / "adapter", ["rain", "snow"])
    data = with_change("model.adapter", "adapter")
    del data["model"]["classes"]
    assert_error(write_recipe(tmp_path, data), "variants.0.classes.haze")


def test_adapter_classes_mismatch(tmp_path: Path) -> None:
    make_adapter(tmp_path / "adapter", ["haze", "rain", "noise"])
    message = assert_error(write_recipe(tmp_path, with_change("model.adapter", "adapter")), "model.classes")
    assert "['haze', 'rain', 'noise']" in message


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    data = with_change("variants.0.classes.snow", 1.0)
    data["model"]["base"] = "missing"
    with pytest.raises(RecipeError) as caught:
        load_recipe(write_recipe(tmp_path, data))
    assert [field for field, _ in caught.value.problems] == ["variants.0.classes.snow", "model.base"]


def test_recipe_error_survives_pickling(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(write_recipe(tmp_path, with_change("sampling.steps", 0)))
    copied = pickle.loads(pickle.dumps(caught.value))
    assert str(copied) == str(caught.value) and copied.problems == caught.value.problems


def test_missing_file_and_bad_yaml_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="nothere.yaml"):
        load_recipe(tmp_path / "nothere.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {base: tiny\nvariants: [")
    with pytest.raises(RecipeError, match="broken.yaml: invalid YAML"):
        load_recipe(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="list.yaml: a recipe is a YAML mapping"):
        load_recipe(listing)


def test_empty_file_reports_missing_sections(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(RecipeError) as caught:
        load_recipe(empty)
    assert {field for field, _ in caught.value.problems} == {"model", "input", "output", "variants"}


def test_python_object_tags_are_refused(tmp_path: Path) -> None:
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(RecipeError, match="tagged.yaml: invalid YAML"):
        load_recipe(tagged)


def test_overrides_set_values_with_yaml_types(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, VALID)
    recipe = load_recipe(
        path,
        [
            "sampling.steps=20",
            "sampling.guidance=3",
            "model.compile=true",
            "variants.0.classes.rain=[0.1, 0.5]",
            "variants.1.name=renamed",
            "output.dir=elsewhere/out",
        ],
    )
    assert recipe.sampling.steps == 20 and isinstance(recipe.sampling.steps, int)
    assert recipe.sampling.guidance == 3.0 and isinstance(recipe.sampling.guidance, float)
    assert recipe.model.compile is True
    assert recipe.variants[0].classes["rain"] == [0.1, 0.5]
    assert recipe.variants[1].name == "renamed"
    assert recipe.output_dir() == tmp_path / "elsewhere" / "out"


def test_override_creates_missing_sections(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    del data["sampling"]
    recipe = load_recipe(write_recipe(tmp_path, data), ["sampling.seed=7"])
    assert recipe.sampling.seed == 7 and recipe.sampling.steps == 28


@pytest.mark.parametrize(
    "override",
    [
        "sampling.steps",
        "=3",
        "sampling..steps=3",
        "variants.5.name=x",
        "variants.name=x",
        "sampling.steps.deeper=1",
        "sampling.steps=[1,",
    ],
)
def test_bad_overrides_name_the_override(tmp_path: Path, override: str) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(write_recipe(tmp_path, VALID), [override])
    assert f"--set {override!r}" in str(caught.value) and "recipe.yaml" in str(caught.value)


def test_override_values_are_validated_and_blamed_on_the_override(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, VALID)
    assert_error(path, "sampling.steps (from --set sampling.steps=abc)", ("sampling.steps=abc",))
    assert_error(path, "sampling.newfield (from --set sampling.newfield=1)", ("sampling.newfield=1",))
    assert_error(path, "variants.1.repeats (from --set variants.mix.repeats=0)", ("variants.mix.repeats=0",))
    assert_error(path, "sampling.steps (from --set sampling={steps: 0})", ("sampling.steps=3", "sampling={steps: 0}"))
    assert "from --set" not in assert_error(
        write_recipe(tmp_path, with_change("sampling.steps", 0)), "sampling.steps", ("sampling.seed=3",)
    )


def test_unknown_field_suggests_the_closest_valid_one(tmp_path: Path) -> None:
    assert "did you mean 'steps'?" in assert_error(
        write_recipe(tmp_path, with_change("sampling.stpes", 3)), "sampling.stpes"
    )
    assert "did you mean 'repeats'?" in assert_error(
        write_recipe(tmp_path, with_change("variants.0.repeat", 2)), "variants.0.repeat"
    )
    assert "did you mean 'sampling'?" in assert_error(write_recipe(tmp_path, with_change("samplng", {})), "samplng")
    assert "did you mean 'webdataset'?" in assert_error(
        write_recipe(tmp_path, with_change("output.layout", "webdatset")), "output.layout"
    )
    assert "did you mean" not in assert_error(
        write_recipe(tmp_path, with_change("output.layout", "lmdb")), "output.layout"
    )
    unlike = assert_error(write_recipe(tmp_path, with_change("model.zzz", 1)), "model.zzz")
    assert "known fields here: adapter, base, classes, compile, device, dtype, prompt_cache" in unlike


def test_duplicate_keys_are_refused_naming_both_lines(tmp_path: Path) -> None:
    text = yaml.safe_dump(VALID, sort_keys=False).replace("  steps: 4\n", "  steps: 4\n  steps: 2\n")
    lines = text.splitlines()
    first, again = lines.index("  steps: 4") + 1, lines.index("  steps: 2") + 1
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(caught.value) == (
        f"{path}: line {again}: duplicate key 'steps' (first at line {first}); each key may appear once in a mapping"
    )
    merged = tmp_path / "merge.yaml"  # a merge key may be overridden: that is no duplicate
    merged.write_text(
        text.replace("  steps: 2\n", "").replace("sampling:\n", "defaults: &d {steps: 4}\nsampling:\n  <<: *d\n")
    )
    with pytest.raises(RecipeError, match="defaults: unknown field"):
        load_recipe(merged)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("seed: " + "[" * 600 + "]" * 600, "nested deeper than 32 levels"),
        (
            "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
            + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)),
            "expands to more than 100,000 values",
        ),
        ("a: &a [*a]\n", "line 1: invalid recipe: an alias refers to a collection that contains it"),
    ],
)
def test_hostile_yaml_is_a_recipe_error(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=expected) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_recipe_file_size_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="/dev/zero: larger than 1024 KiB"):
        load_recipe("/dev/zero")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"model: \xff\xfe")
    with pytest.raises(RecipeError, match="binary.yaml: not UTF-8 text"):
        load_recipe(binary)


def test_repeats_are_bounded(tmp_path: Path) -> None:
    assert "less than or equal to 1000" in assert_error(
        write_recipe(tmp_path, with_change("variants.1.repeats", 1_000_000)), "variants.1.repeats"
    )


def test_fifo_input_path_is_not_a_regular_file(tmp_path: Path) -> None:
    import os  # noqa: PLC0415

    os.mkfifo(tmp_path / "pipe")
    message = assert_error(write_recipe(tmp_path, with_change("input.paths", ["pipe"])), "input.paths.0")
    assert "not a regular file or folder" in message


def test_prompt_cache_location(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, VALID))
    assert recipe.prompt_cache_dir({"MDSD3_PROMPT_CACHE": "/cache/p"}) == Path("/cache/p")
    assert recipe.prompt_cache_dir({}) == Path("~/.cache/mdsd3/prompts").expanduser()
    explicit = load_recipe(write_recipe(tmp_path, with_change("model.prompt_cache", "cache")))
    assert explicit.prompt_cache_dir({"MDSD3_PROMPT_CACHE": "/cache/p"}) == tmp_path / "cache"


@pytest.mark.parametrize(
    "override",
    [
        "input.workers=8",
        "output.workers=8",
        "model.device=cuda:1",
        "model.dtype=float32",
        "model.compile=true",
        "model.prompt_cache=elsewhere",
        "output.png_compress_level=9",
        "output.quality=50",
        "input.paths=[photos/, photos]",
    ],
)
def test_identity_ignores_execution_settings(tmp_path: Path, override: str) -> None:
    path = write_recipe(tmp_path, VALID)
    assert load_recipe(path, [override]).identity() == load_recipe(path).identity()


@pytest.mark.parametrize(
    "override",
    [
        "sampling.steps=5",
        "sampling.batch_size=16",
        "sampling.seed=2",
        "sampling.guidance=4.5",
        "sampling.grid_shifts=2",
        "sampling.alpha=0.5",
        "variants.1.beta=0.1",
        "variants.0.classes.rain=0.5",
        "variants.1.repeats=3",
        "variants.0.name=other",
        "input.size=256",
        "input.resize=resize",
        "output.format=jpeg",
        "model.classes=[rain, haze, fog]",
    ],
)
def test_identity_follows_output_settings(tmp_path: Path, override: str) -> None:
    path = write_recipe(tmp_path, VALID)
    assert load_recipe(path, [override]).identity() != load_recipe(path).identity()


def test_identity_uses_effective_alpha_beta_and_lossy_quality(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, VALID)
    plain = load_recipe(path).identity()
    assert plain["variants"][0]["alpha"] == 1.0 and plain["variants"][1]["alpha"] == 0.9
    assert plain["sampling"]["batch_size"] == 2
    assert "grid_shifts" not in plain["sampling"]  # grid_shifts 1: the identity of runs made before it existed
    jpeg = load_recipe(path, ["output.format=jpeg"])
    assert jpeg.identity() != load_recipe(path, ["output.format=jpeg", "output.quality=50"]).identity()


def test_example_recipe_loads_and_sets_every_field(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(example_recipe_text())
    (tmp_path / "photos").mkdir()
    recipe = load_recipe(path)
    assert recipe.model.base == "tiny" and recipe.classes() == ["rain", "haze", "noise"]
    raw = yaml.safe_load(example_recipe_text())
    sections = {"model": ModelSection, "input": InputSection, "output": OutputSection, "sampling": SamplingSection}
    for name, schema in sections.items():
        assert set(raw[name]) == set(schema.model_fields), name
    assert set().union(*(variant.keys() for variant in raw["variants"])) == set(Variant.model_fields)
    assert "#" in example_recipe_text()


def test_example_recipe_needs_its_photos_folder(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(example_recipe_text())
    assert_error(path, "input.paths.0")


# ---------------------------------------------------------------- one dialect for generate and train recipes

TRAIN_TEXT = """\
classes: [haze]
datasets: [{name: pairs, kind: paired_folders, clean: clean, degraded: degraded, classes: {haze: 1.0}}]
train: {lr: 1e-4, steps: 20}
output: {dir: ~/runs/x}
"""


def test_a_train_recipe_is_read_as_strictly_as_a_generate_recipe(tmp_path: Path) -> None:
    from mdsd3_cli.recipe.safe_yaml import load_yaml
    from mdsd3_cli.recipe.train import TrainRecipeError, load_train_recipe

    (tmp_path / "clean").mkdir()
    (tmp_path / "degraded").mkdir()
    path = tmp_path / "train.yaml"
    path.write_text(TRAIN_TEXT)
    recipe = load_train_recipe(path)
    assert (recipe.train.lr, recipe.train.steps) == (1e-4, 20)  # 1e-4 is a number (YAML 1.2), in both recipes
    assert recipe.datasets[0].clean == tmp_path / "clean" and recipe.output.dir == Path.home() / "runs" / "x"
    generate = write_recipe(tmp_path, {**VALID, "sampling": {**VALID["sampling"], "guidance": 7e0}})
    generate.write_text(generate.read_text().replace("guidance: 7.0", "guidance: 7e0"))
    assert load_recipe(generate).sampling.guidance == 7.0
    assert load_yaml("[1e-4, 3.0e-3, 1.5E+4, -2e3, 1_000e1, x1e5]", "t") == [1e-4, 3e-3, 1.5e4, -2e3, 1e4, "x1e5"]
    assert yaml.safe_load("1e-4") == "1e-4"  # PyYAML's own loader is left as it was

    wrong = ['train.steps="20"', 'data.random_flip="true"', "train.lr=.nan", "model.device=mps", "train.stpes=2"]
    with pytest.raises(TrainRecipeError) as caught:  # generate refuses each of these the same way
        load_train_recipe(path, wrong)
    assert isinstance(caught.value, RecipeError)
    lines = str(caught.value).splitlines()
    for field in ("train.steps", "data.random_flip", "train.lr", "model.device", "train.stpes"):
        assert any(line.startswith(f"{path}: {field} (from --set ") for line in lines), (field, lines)
    assert any("train.stpes (from --set train.stpes=2): unknown field; did you mean 'steps'?" in line for line in lines)
    assert pickle.loads(pickle.dumps(caught.value)).problems == caught.value.problems


@pytest.mark.parametrize("module", ["mdsd3_cli.recipe.train", "mdsd3_cli.recipe.generate"])
def test_loading_a_recipe_module_loads_no_torch(module: str) -> None:
    """`mdsd3 check` and recipe tooling read recipes without paying torch's import."""
    import subprocess
    import sys

    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
