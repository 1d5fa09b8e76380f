"""The deterministic work list: one item per (source image, variant, repeat) with its own seed and
concrete class ratios, and the split of that list into shards that own whole source images."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from mdsd3_cli.dataset.names import shard_name
from mdsd3_cli.model.sampler import SampleRequest
from mdsd3_cli.pipeline.requests import sample_request
from mdsd3_cli.recipe.generate import Recipe


class ShardError(ValueError):
    """Shard flags or launcher environment that do not describe one valid shard."""


class SourceLike(Protocol):
    """A discovered input image: its output key (`sub/photo1`) and its file."""

    key: str
    path: Path


S = TypeVar("S", bound="tuple[str, Path] | SourceLike")


@dataclass(frozen=True)
class WorkItem:
    """One sample to produce: the source image under one variant and repeat (1-based)."""

    key: str
    source: Path
    variant: str
    repeat: int
    folder: str
    request: SampleRequest = field(hash=False)
    """Its seed, ratios, α and β (`pipeline.requests.sample_request`)."""


def _key_and_path(source: tuple[str, Path] | SourceLike) -> tuple[str, Path]:
    if isinstance(source, tuple):
        key, path = source
    else:
        key, path = source.key, source.path
    return key, Path(path)


def check_unique_keys(sources: Sequence[tuple[str, Path] | SourceLike]) -> list[tuple[str, Path]]:
    """The sources' (key, path) pairs sorted by key; ValueError naming both files when two share a key."""
    pairs = sorted(_key_and_path(source) for source in sources)
    for (key, first), (next_key, second) in zip(pairs, pairs[1:]):
        if key == next_key:
            raise ValueError(f"two inputs have the output key {key!r}: {first} and {second}")
    return pairs


def source_plan(recipe: Recipe, key: str, path: Path, classes: Sequence[str]) -> list[WorkItem]:
    """One source image's samples in plan order (variant order in the recipe, then repeat): at most
    `recipe.file.MAX_SAMPLES_PER_INPUT` items, the bound every recipe is checked against."""
    items = []
    for variant in recipe.variants:
        for repeat in range(1, variant.repeats + 1):
            items.append(
                WorkItem(
                    key=key,
                    source=path,
                    variant=variant.name,
                    repeat=repeat,
                    folder=variant.folder(repeat),
                    request=sample_request(recipe, key, variant, repeat, classes),
                )
            )
    return items


def iter_plan(recipe: Recipe, sources: Sequence[tuple[str, Path] | SourceLike]) -> Iterator[WorkItem]:
    """Every sample of the recipe in plan order (key, variant order in the recipe, repeat), built one source image
    at a time: the plan is never held whole. Keys must be unique (checked before the first item)."""
    pairs = check_unique_keys(sources)
    classes = recipe.classes()
    for key, path in pairs:
        yield from source_plan(recipe, key, path, classes)


def build_plan(recipe: Recipe, sources: Sequence[tuple[str, Path] | SourceLike]) -> list[WorkItem]:
    """`iter_plan` held as a list, for plans that must be seen whole (the webdataset layout's tar groups)."""
    return list(iter_plan(recipe, sources))


def _check_shard(index: int, count: int) -> None:
    if count < 1 or not 0 <= index < count:
        raise ShardError(f"shard index {index} of {count}: need count >= 1 and 0 <= index < count")


def shard_sources(sources: Sequence[S], index: int, count: int) -> list[S]:
    """The sources of shard `index` of `count`: source i in sorted key order belongs to shard i % count, so
    shards own whole source images and a shard's plan is `build_plan` of its own sources."""
    _check_shard(index, count)
    return sorted(sources, key=lambda source: _key_and_path(source)[0])[index::count]


@dataclass(frozen=True)
class ShardSpec:
    """Which part of the plan this process owns."""

    index: int
    count: int

    def __post_init__(self) -> None:
        _check_shard(self.index, self.count)

    @property
    def name(self) -> str:
        """File stem for this shard's manifest and error logs, e.g. `shard-00003-of-00008`."""
        return shard_name(self.index, self.count)


def _env_int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ShardError(f"${name} is {environ[name]!r}, not an integer") from None


def _slurm_shard(environ: Mapping[str, str]) -> ShardSpec | None:
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    if "SLURM_ARRAY_TASK_COUNT" not in environ:
        raise ShardError(
            "$SLURM_ARRAY_TASK_ID is set but $SLURM_ARRAY_TASK_COUNT is not; pass --shard-index and --num-shards"
        )
    task, count = _env_int(environ, "SLURM_ARRAY_TASK_ID"), _env_int(environ, "SLURM_ARRAY_TASK_COUNT")
    first = _env_int(environ, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in environ else 0
    step = _env_int(environ, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in environ else 1
    offset = task - first
    if step < 1 or offset % step or not 0 <= offset // step < count:
        raise ShardError(
            f"SLURM array task {task} (min {first}, step {step}, count {count}) is not one of "
            f"{count} evenly spaced tasks; use --array=A-B[:S] or pass --shard-index/--num-shards"
        )
    return ShardSpec(offset // step, count)


def _torchrun_shard(environ: Mapping[str, str]) -> ShardSpec | None:
    present = [name for name in ("RANK", "WORLD_SIZE") if name in environ]
    if not present:
        return None
    if len(present) == 1:
        raise ShardError(f"only ${present[0]} of $RANK/$WORLD_SIZE is set; pass --shard-index and --num-shards")
    rank, world = _env_int(environ, "RANK"), _env_int(environ, "WORLD_SIZE")
    if world < 1 or not 0 <= rank < world:
        raise ShardError(f"$RANK={rank} with $WORLD_SIZE={world} is not a valid rank")
    return ShardSpec(rank, world)


def detect_shard(index: int | None, count: int | None, environ: Mapping[str, str]) -> ShardSpec:
    """This process's shard: explicit flags (both or neither), else SLURM array x torchrun ranks, else (0, 1).

    Under both launchers the shard is `slurm_index * world_size + rank` of `slurm_count * world_size`.
    """
    if index is not None or count is not None:
        if index is None or count is None:
            raise ShardError("--shard-index and --num-shards must be given together")
        return ShardSpec(index, count)
    slurm, torchrun = _slurm_shard(environ), _torchrun_shard(environ)
    if slurm and torchrun:
        return ShardSpec(slurm.index * torchrun.count + torchrun.index, slurm.count * torchrun.count)
    return slurm or torchrun or ShardSpec(0, 1)
