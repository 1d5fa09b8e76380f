"""Work plan: order, per-sample seeds and ratio draws, shard ownership and launcher detection."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mdsd3_cli.generate.plan import (
    ShardError,
    ShardSpec,
    WorkItem,
    build_plan,
    detect_shard,
    iter_plan,
    shard_sources,
    source_plan,
)
from mdsd3_cli.pipeline.requests import sample_seed
from mdsd3_cli.recipe.generate import Recipe, parse_recipe

from .helpers import generate_recipe, recipe_data, yaml_text

KEYS = ["b/photo2", "a", "c", "b/photo1", "d", "e", "f"]


PLAN_RECIPE: dict[str, Any] = {
    "model": {"base": "tiny", "classes": ["rain", "haze", "noise"]},
    "input": {"paths": ["."]},
    "output": {"dir": "out"},
    "sampling": {"seed": 0, "alpha": 1.0, "beta": 0.0},
    "variants": [
        {"name": "rain", "classes": {"rain": 1.0}},
        {
            "name": "mix",
            "classes": {"rain": [0.3, 1.0], "haze": [0.0, 0.6], "noise": 0.5},
            "repeats": 3,
            "alpha": 0.9,
            "beta": 0.4,
        },
    ],
}


def make_recipe(tmp_path: Path, variants: list[dict[str, Any]] | None = None, seed: int = 0) -> Recipe:
    overrides = [f"sampling.seed={seed}"] + ([f"variants={yaml_text(variants)}"] if variants else [])
    return parse_recipe(recipe_data(*overrides, base=PLAN_RECIPE), tmp_path / "recipe.yaml")


def sources(keys: list[str] = KEYS) -> list[tuple[str, Path]]:
    return [(key, Path("/photos") / f"{key}.jpg") for key in keys]


def test_plan_order_folders_and_fields(tmp_path: Path) -> None:
    plan = build_plan(make_recipe(tmp_path), sources())
    assert len(plan) == len(KEYS) * 4
    assert [(item.key, item.folder) for item in plan[:8]] == [
        ("a", "rain"),
        ("a", "mix_r1"),
        ("a", "mix_r2"),
        ("a", "mix_r3"),
        ("b/photo1", "rain"),
        ("b/photo1", "mix_r1"),
        ("b/photo1", "mix_r2"),
        ("b/photo1", "mix_r3"),
    ]
    first, mixed = plan[0], plan[2]
    assert (first.variant, first.repeat, first.source, first.request.alpha, first.request.beta) == (
        "rain",
        1,
        Path("/photos/a.jpg"),
        1.0,
        0.0,
    )
    assert first.request.ratios == {"rain": 1.0, "haze": 0.0, "noise": 0.0}
    assert (mixed.variant, mixed.repeat, mixed.request.alpha, mixed.request.beta) == ("mix", 2, 0.9, 0.4)
    assert list(mixed.request.ratios) == ["rain", "haze", "noise"] and mixed.request.ratios["noise"] == 0.5
    assert first.request.seed == sample_seed(0, "a", "rain", 1)
    assert len({item for item in plan}) == len(plan)


def test_sources_with_key_and_path_attributes(tmp_path: Path) -> None:
    @dataclass
    class Source:
        key: str
        path: Path

    recipe = make_recipe(tmp_path)
    assert build_plan(recipe, [Source(k, p) for k, p in sources()]) == build_plan(recipe, sources())


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'a'"):
        build_plan(make_recipe(tmp_path), [("a", Path("/x/a.png")), ("a", Path("/y/a.jpg"))])


def test_sample_seed_is_stable_and_63_bits() -> None:
    pinned = 4052186269320365055  # the seed scheme must never change: it would change every output
    assert sample_seed(0, "a", "rain", 1) == sample_seed(0, "a", "rain", 1) == pinned
    seeds = {
        sample_seed(seed, key, variant, repeat)
        for seed in (0, 1)
        for key in ("a", "b", "a/b")
        for variant in ("rain", "mix")
        for repeat in (1, 2)
    }
    assert len(seeds) == 2 * 3 * 2 * 2
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_seeds_are_distinct_across_the_plan(tmp_path: Path) -> None:
    plan = build_plan(make_recipe(tmp_path), sources())
    assert len({item.request.seed for item in plan}) == len(plan)
    other_seed = build_plan(make_recipe(tmp_path, seed=1), sources())
    assert not {item.request.seed for item in plan} & {item.request.seed for item in other_seed}


def test_range_draws_stay_in_bounds_and_vary(tmp_path: Path) -> None:
    plan = build_plan(make_recipe(tmp_path), sources([f"img{i:03d}" for i in range(100)]))
    mixed = [item.request.ratios for item in plan if item.variant == "mix"]
    assert all(0.3 <= ratios["rain"] <= 1.0 and 0.0 <= ratios["haze"] <= 0.6 for ratios in mixed)
    assert len({ratios["rain"] for ratios in mixed}) == len(mixed)
    assert min(r["rain"] for r in mixed) < 0.4 and max(r["rain"] for r in mixed) > 0.9


def test_items_do_not_depend_on_order_subset_or_sharding(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path)
    full = build_plan(recipe, sources())
    by_sample = {(item.key, item.folder): item for item in full}
    for partial in (
        build_plan(recipe, sources(KEYS[::-1])),
        build_plan(recipe, sources(["d", "a"])),
        build_plan(recipe, shard_sources(sources(), 1, 3)),
    ):
        assert all(by_sample[(item.key, item.folder)] == item for item in partial)
    assert build_plan(recipe, sources(KEYS[::-1])) == full


def test_a_class_draw_ignores_other_classes_specs(tmp_path: Path) -> None:
    narrow = [{"name": "mix", "classes": {"rain": [0.3, 1.0]}, "repeats": 2}]
    wider = [{"name": "mix", "classes": {"rain": [0.3, 1.0], "haze": [0.2, 0.4], "noise": 1.0}, "repeats": 2}]
    first = build_plan(make_recipe(tmp_path, narrow), sources())
    second = build_plan(make_recipe(tmp_path, wider), sources())
    assert [item.request.ratios["rain"] for item in first] == [item.request.ratios["rain"] for item in second]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_shards_partition_the_plan_by_source(tmp_path: Path, count: int) -> None:
    recipe = make_recipe(tmp_path)
    plan = build_plan(recipe, sources())
    shards = [build_plan(recipe, shard_sources(sources(), index, count)) for index in range(count)]
    assert sorted((item.key, item.folder) for shard in shards for item in shard) == sorted(
        (item.key, item.folder) for item in plan
    )
    owners: dict[str, set[int]] = {}
    for index, shard in enumerate(shards):
        for item in shard:
            owners.setdefault(item.key, set()).add(index)
    assert all(len(owner) == 1 for owner in owners.values())
    assert [owners[key].pop() for key in sorted(KEYS)] == [i % count for i in range(len(KEYS))]


def test_shard_keeps_plan_order(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path)
    plan = build_plan(recipe, sources())
    shard = build_plan(recipe, shard_sources(sources(), 0, 2))
    assert shard == [item for item in plan if item in shard]
    assert [item.key for item in shard[::4]] == ["a", "b/photo2", "d", "f"]


@pytest.mark.parametrize(("index", "count"), [(-1, 2), (2, 2), (0, 0)])
def test_invalid_shards(index: int, count: int) -> None:
    with pytest.raises(ShardError):
        shard_sources([], index, count)
    with pytest.raises(ShardError):
        ShardSpec(index, count)


def test_shard_name() -> None:
    assert ShardSpec(3, 8).name == "shard-00003-of-00008"
    assert ShardSpec(0, 1).name == "shard-00000-of-00001"


def test_detect_shard_without_launcher() -> None:
    assert detect_shard(None, None, {"LOCAL_RANK": "3"}) == ShardSpec(0, 1)


def test_detect_shard_flags_win() -> None:
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "RANK": "1", "WORLD_SIZE": "2"}
    assert detect_shard(2, 5, env) == ShardSpec(2, 5)
    with pytest.raises(ShardError, match="^--shard-index and --num-shards must be given together$"):
        detect_shard(2, None, {})
    with pytest.raises(ShardError, match="together"):
        detect_shard(None, 3, {})
    with pytest.raises(ShardError):
        detect_shard(3, 3, {})


def test_detect_shard_slurm_array() -> None:
    assert detect_shard(None, None, {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == ShardSpec(2, 4)
    offset = {"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10"}
    assert detect_shard(None, None, offset) == ShardSpec(1, 4)
    stepped = {
        "SLURM_ARRAY_TASK_ID": "8",
        "SLURM_ARRAY_TASK_COUNT": "4",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_STEP": "4",
    }
    assert detect_shard(None, None, stepped) == ShardSpec(2, 4)


@pytest.mark.parametrize(
    "env",
    [
        {"SLURM_ARRAY_TASK_ID": "1"},
        {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"},
        {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"},
        {"RANK": "0"},
        {"WORLD_SIZE": "2"},
        {"RANK": "2", "WORLD_SIZE": "2"},
    ],
)
def test_detect_shard_refuses_incomplete_or_inconsistent_env(env: dict[str, str]) -> None:
    with pytest.raises(ShardError):
        detect_shard(None, None, env)


def test_shard_messages_name_the_real_flags() -> None:
    for env in ({"RANK": "1"}, {"SLURM_ARRAY_TASK_ID": "1"}):
        with pytest.raises(ShardError, match="pass --shard-index and --num-shards$"):
            detect_shard(None, None, env)


def test_detect_shard_torchrun() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert detect_shard(None, None, env) == ShardSpec(3, 4)


def test_detect_shard_slurm_and_torchrun() -> None:
    env = {
        "SLURM_ARRAY_TASK_ID": "6",
        "SLURM_ARRAY_TASK_MIN": "5",
        "SLURM_ARRAY_TASK_COUNT": "3",
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
    }
    assert detect_shard(None, None, env) == ShardSpec(1 * 2 + 1, 3 * 2)
    specs = {
        detect_shard(
            None,
            None,
            {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "3", "RANK": str(rank), "WORLD_SIZE": "2"},
        )
        for task in range(3)
        for rank in range(2)
    }
    assert specs == {ShardSpec(index, 6) for index in range(6)}


def test_work_item_is_frozen(tmp_path: Path) -> None:
    item: WorkItem = build_plan(make_recipe(tmp_path), sources(["a"]))[0]
    with pytest.raises(AttributeError):
        item.request = item.request  # type: ignore[misc]


def test_a_plan_is_iterated_one_source_image_at_a_time(tmp_path: Path) -> None:
    """Iterating a plan holds one source image's samples, never the whole plan (issue 27, item 10)."""
    import tracemalloc

    recipe = make_recipe(tmp_path, [{"name": "mix", "classes": {"rain": [0.3, 1.0], "haze": 0.5}, "repeats": 10}])
    many = sources([f"img{index:04d}" for index in range(1000)])  # 10,000 samples
    tracemalloc.start()
    try:
        iterated = hashlib.sha256()
        for item in iter_plan(recipe, many):
            iterated.update(repr((item.key, item.folder, item.request.seed, item.request.ratios)).encode())
        _, iterated_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        tracemalloc.start()
        held = build_plan(recipe, many)
        _, held_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    held_digest = hashlib.sha256()
    for item in held:
        held_digest.update(repr((item.key, item.folder, item.request.seed, item.request.ratios)).encode())
    assert iterated.hexdigest() == held_digest.hexdigest() and len(held) == 10_000
    assert iterated_peak < held_peak / 10, (iterated_peak, held_peak)  # seen: 0.24 MiB against 4.5 MiB
    assert source_plan(recipe, "img0007", Path("/photos/img0007.jpg"), recipe.classes()) == held[70:80]


def test_generate_never_holds_the_whole_plan_in_the_folders_layout(tiny_photos, tmp_path, monkeypatch):
    from mdsd3_cli.generate.run import RunPlan, plan_run, run_generate
    from mdsd3_cli.recipe.generate import load_recipe

    monkeypatch.setattr(RunPlan, "mine", property(lambda run: pytest.fail("the whole plan was built")))
    recipe = load_recipe(generate_recipe(tmp_path / "recipe.yaml", tiny_photos, tmp_path / "out"))
    summary = run_generate(plan_run(recipe, ShardSpec(0, 1), limit=1))
    assert (summary.exit_code, summary.planned, summary.written) == (0, 3, 3)
