"""`mdsd3 generate`: recipe -> plan -> shard -> resume filter -> decode -> sample -> write."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import rich.console
import torch
from rich.markup import escape
from rich.table import Table

from mdsd3_cli.dataset.completeness import ShardPlan, begin_shard, finish_shard, plan_fingerprint
from mdsd3_cli.dataset.layout_writer import LayoutWriter
from mdsd3_cli.dataset.names import RUN_JSON
from mdsd3_cli.dataset.ownership import claim_output, clear_outputs, shard_lock, sharding_lock
from mdsd3_cli.dataset.run_record import check_run_compatible, write_run_json
from mdsd3_cli.generate.inputs import decode_failures
from mdsd3_cli.generate.layouts import completed_in_layout, open_layout_writer
from mdsd3_cli.generate.plan import (
    ShardSpec,
    WorkItem,
    build_plan,
    check_unique_keys,
    iter_plan,
    shard_sources,
    source_plan,
)
from mdsd3_cli.model.heads import prompt_for
from mdsd3_cli.pipeline.inputs import FailedInput, discovery_failures, load_input
from mdsd3_cli.pipeline.pipeline import MDSD3Pipeline, needed_prompts
from mdsd3_cli.recipe.generate import Recipe
from mdsd3_cli.util.images import Discovery, ImageError, LoadedImage, Source, discover_sources, iter_loaded
from mdsd3_cli.util.progress import Console, RunProgress
from mdsd3_cli.util.runtime import StopRequest, exit_code_for, resolve_dtype
from mdsd3_cli.util.version import __version__

EXIT_OK, EXIT_FAILED_INPUTS = 0, 1
FAILURES_SHOWN = 5
"""Failed inputs a run summary keeps to show (all are in the errors file)."""


class InputsError(ValueError):
    """The recipe's inputs cannot be used at all (a listed path is missing or matches nothing)."""


@dataclass
class RunPlan:
    """What a run would do, known before any model loads. Plans are counted, not built: a run that samples builds
    this shard's samples one source image at a time (`todo`, `todo_of`; shards own whole source images, so no
    shard needs the others' samples); only the webdataset layout holds them whole (`mine`, its tar groups);
    `check` and `--dry-run` only count."""

    recipe: Recipe
    shard: ShardSpec
    discovery: Discovery
    sources_in_plan: int
    samples_in_plan: int
    my_sources: list[Source]
    limit: int | None = None
    done: set[tuple[str, str]] = field(default_factory=set)
    settled: dict[str, FailedInput] = field(default_factory=dict)
    """Inputs an earlier run recorded as failed that are not retried (webdataset: their tar is finished)."""

    @cached_property
    def mine(self) -> list[WorkItem]:
        """This shard's samples in plan order, held in memory."""
        return build_plan(self.recipe, self.my_sources)

    def todo(self) -> Iterator[WorkItem]:
        """This shard's samples not done yet (settled inputs left out), in plan order, built one source image at a
        time."""
        return (
            item
            for item in iter_plan(self.recipe, self.my_sources)
            if (item.key, item.folder) not in self.done and item.key not in self.settled
        )

    def todo_of(self, source: Source) -> list[WorkItem]:
        """One source image's samples not done yet, in plan order."""
        return [
            item
            for item in source_plan(self.recipe, source.key, Path(source.path), self.recipe.classes())
            if (item.key, item.folder) not in self.done
        ]

    @property
    def samples_in_shard(self) -> int:
        return len(self.my_sources) * self.recipe.samples_per_input()

    @property
    def samples_to_do(self) -> int:
        settled = self.recipe.samples_per_input() * len(self.settled)
        return self.samples_in_shard - sum(self.done_per_key().values()) - settled

    def shard_plan(self) -> ShardPlan:
        """What this shard records as its plan (`dataset.completeness`), counted, not built."""
        folders = [folder for variant in self.recipe.variants for folder in variant.folders()]
        return ShardPlan(
            self.shard.name,
            self.samples_in_shard,
            len(folders),
            self.samples_in_plan,
            plan_fingerprint((source.key for source in self.my_sources), folders),
        )

    def done_per_key(self) -> Counter[str]:
        """How many of each of this shard's keys' samples are done (counted from `done`, nothing built)."""
        keys = {source.key for source in self.my_sources}
        folders = {folder for variant in self.recipe.variants for folder in variant.folders()}
        return Counter(key for key, folder in self.done if key in keys and folder in folders)

    @property
    def identity(self) -> dict:
        """What run.json must match: the recipe's identity, plus how keys are formed when several input
        folders prefix them with their names (adding a folder to a one-folder run changes every key)."""
        identity = self.recipe.identity()
        if self.discovery.prefixed_keys:
            identity["input_keys"] = "prefixed with the input folder name"
        return identity


@dataclass
class RunSummary:
    """Counts and timings of one `generate` run (one shard)."""

    shard: str
    planned: int = 0
    already_done: int = 0
    written: int = 0
    """Samples written and kept (webdataset: in finished tars)."""
    dropped: int = 0
    """Samples sampled but not kept: those of a webdataset tar left unfinished by a stop signal."""
    failed_inputs: int = 0
    elapsed_s: float = 0.0
    sampler_s: float = 0.0
    interrupted: str | None = None
    batch_size: int = 0
    failures: list[FailedInput] = field(default_factory=list)
    """The first FAILURES_SHOWN failed inputs."""
    errors_file: Path | None = None
    """This shard's errors file, listing every failed input of the run."""
    failed_keys: set[str] = field(default_factory=set)

    def record_failure(self, failure: FailedInput) -> None:
        """Count a failed input, keeping the first few to show."""
        self.failed_inputs += 1
        if failure.key is not None:
            self.failed_keys.add(failure.key)
        if len(self.failures) < FAILURES_SHOWN:
            self.failures.append(failure)

    @property
    def images_per_s(self) -> float:
        return self.written / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def sampler_busy(self) -> float:
        return self.sampler_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return exit_code_for(self.interrupted)
        return EXIT_FAILED_INPUTS if self.failed_inputs else EXIT_OK

    def table(self) -> Table:
        table = Table(title=f"mdsd3 generate — {self.shard}", show_header=False)
        rows = [
            ("samples in this shard", self.planned),
            ("already done (resumed)", self.already_done),
            ("written now", self.written),
            ("failed inputs", self.failed_inputs),
            *(
                [
                    (
                        "sampled, not kept",
                        f"{self.dropped} (their tar was unfinished; lower output.samples_per_tar to keep more)",
                    )
                ]
                if self.dropped
                else []
            ),
            ("elapsed", f"{self.elapsed_s:.1f} s"),
            ("images/s", f"{self.images_per_s:.2f}"),
            ("sampler busy", f"{100 * self.sampler_busy:.0f}% of wall time"),
        ]
        if self.interrupted:
            rows.append(("stopped by", f"{self.interrupted} (rerun the same command to finish)"))
        for name, value in rows:
            table.add_row(name, str(value))
        return table


def plan_run(recipe: Recipe, shard: ShardSpec, limit: int | None = None) -> RunPlan:
    """Discover inputs, count the deterministic plan and build this shard's part; reads manifests, writes nothing."""
    discovery = discover_sources(recipe.input_paths(), recursive=recipe.input.recursive, exclude=[recipe.output_dir()])
    fatal = [error for error in discovery.errors if error.fatal]
    if fatal:
        lines = "\n".join(f"  {error.path}: {error.reason}" for error in fatal)
        raise InputsError(f"{recipe.source_path}: input.paths: unusable entries:\n{lines}")
    sources = sorted(discovery.sources, key=lambda source: source.key)[:limit]  # --limit: the first N keys
    per_source = recipe.samples_per_input()
    mine = shard_sources(sources, shard.index, shard.count)
    check_unique_keys(mine)
    run = RunPlan(recipe, shard, discovery, len(sources), len(sources) * per_source, mine, limit)
    run.done, run.settled = completed_in_layout(recipe, shard, lambda: run.mine)
    return run


def _batches(
    loaded: Iterator[tuple[Source, LoadedImage | ImageError]],
    todo: Callable[[Source], list[WorkItem]],
    batch_size: Callable[[], int],
    on_error: Callable[[Source, str], None],
    stop: StopRequest,
) -> Iterator[list[tuple[WorkItem, LoadedImage]]]:
    """Group samples of equally sized images into batches of the current batch size (it drops after an
    out-of-memory); yield nothing more once a stop is requested, even within one image's many repeats."""
    pending: dict[tuple[int, ...], list[tuple[WorkItem, LoadedImage]]] = defaultdict(list)
    for source, image in loaded:
        if stop.requested:
            return
        if isinstance(image, ImageError):
            on_error(source, image.reason)
            continue
        group = pending[image.pixels.shape]
        group.extend((item, image) for item in todo(source))
        while len(group) >= batch_size():
            if stop.requested:
                return
            batch, group[:] = group[: batch_size()], group[batch_size() :]
            yield batch
    for group in pending.values():
        while group and not stop.requested:
            batch, group[:] = group[: batch_size()], group[batch_size() :]
            yield batch


def _record(item: WorkItem, image: LoadedImage, run: RunPlan, pipeline: MDSD3Pipeline) -> dict:
    recipe, request = run.recipe, item.request
    return {
        "key": item.key,
        "source": str(item.source),
        "variant": item.variant,
        "folder": item.folder,
        "repeat": item.repeat,
        "ratios": request.ratios,
        "prompt": prompt_for(request.ratios, pipeline.classes),
        "alpha": request.alpha,
        "beta": request.beta,
        "steps": recipe.sampling.steps,
        "guidance": recipe.sampling.guidance,
        **({"class_guidance": dict(request.class_guidance)} if request.class_guidance else {}),
        "seed": request.seed,
        "size": [int(image.pixels.shape[1]), int(image.pixels.shape[0])],
        "crop_box": list(image.crop_box),
        "original_size": list(image.original_size),
        "base_fingerprint": pipeline.base.fingerprint,
        "adapter_fingerprint": pipeline.adapter_fingerprint,
        "mdsd3_version": __version__,
    }


def run_payload(recipe: Recipe, identity: dict, pipeline: MDSD3Pipeline) -> dict:
    """run.json: the resolved recipe, versions and model fingerprints."""
    import diffusers

    return {
        "identity": identity,
        "recipe": recipe.model_dump(mode="json"),
        "classes": pipeline.adapter.classes,
        "head_partition": pipeline.adapter.head_partition,
        "base_fingerprint": pipeline.base.fingerprint,
        "adapter_fingerprint": pipeline.adapter_fingerprint,
        "versions": {
            "mdsd3": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
    }


def preflight_output(run: RunPlan, overwrite: bool = False) -> None:
    """What `generate` refuses about its output folder before loading a model (`check` and `--dry-run` ask the
    same): a folder mdsd3 did not make, `--overwrite` with shards, a run.json of a different run."""
    out = run.recipe.output_dir()
    claim_output(out)
    if overwrite and run.shard.count > 1:
        raise ValueError(
            "--overwrite clears the whole output folder; it cannot be combined with shards. "
            "Run it once without shards, or choose a new output.dir"
        )
    check_run_compatible(out, run.identity, overwrite=overwrite)


def run_generate(run: RunPlan, overwrite: bool = False, console: rich.console.Console | None = None) -> RunSummary:
    """Produce this shard's missing samples. Resumable: killed at any moment, a rerun completes the same dataset."""
    console = console or Console(stderr=True)
    recipe, out, identity = run.recipe, run.recipe.output_dir(), run.identity
    started = time.perf_counter()
    device = recipe.device()  # a device this machine lacks is refused before anything is written
    preflight_output(run, overwrite)
    with sharding_lock(out, run.shard.count), shard_lock(out, run.shard.name):
        if overwrite:
            clear_outputs(out)
        if overwrite or not (out / RUN_JSON).is_file():  # claims the folder before anything else is written
            write_run_json(out, {"identity": identity, "recipe": recipe.model_dump(mode="json")})
        # again under the lock: a previous holder may have finished more
        run.done, run.settled = completed_in_layout(recipe, run.shard, lambda: run.mine)
        summary = _generate_locked(run, identity, device, console)
    summary.elapsed_s = time.perf_counter() - started
    return summary


def _generate_locked(run: RunPlan, identity: dict, device: torch.device, console: rich.console.Console) -> RunSummary:
    """`run_generate` once this process owns the shard."""
    recipe, out = run.recipe, run.recipe.output_dir()
    per_source, done = recipe.samples_per_input(), run.done_per_key()
    summary = RunSummary(
        shard=run.shard.name,
        planned=run.samples_in_shard,
        already_done=run.samples_in_shard - run.samples_to_do - per_source * len(run.settled),
    )
    dtype = resolve_dtype(recipe.model.dtype, device)

    def announce(received: signal.Signals) -> None:
        console.print(stop_message(received), highlight=False, soft_wrap=True)

    with StopRequest(on_stop=announce) as stop:
        # a finished shard loads no model
        pipeline = MDSD3Pipeline.from_recipe(recipe, device, dtype, console) if run.samples_to_do else None
        if pipeline is not None:
            write_run_json(out, run_payload(recipe, identity, pipeline))
        with open_layout_writer(recipe, run.shard, lambda: run.mine) as writer:  # refuses another webdataset plan
            plan = run.shard_plan()
            begin_shard(out, plan)  # unfinished from here until finish_shard
            summary.errors_file = writer.layout.errors_path(run.shard.name)

            def failed(failure: FailedInput) -> None:
                writer.record_error(failure.key, failure.path, failure.reason)
                summary.record_failure(failure)

            if run.shard.index == 0:
                for failure in discovery_failures(run.discovery):
                    failed(failure)
            for failure in run.settled.values():  # not retried: listed again in this run's errors file
                failed(failure)
            if pipeline is not None:
                _sample_all(run, pipeline, writer, summary, stop, console, failed)
        summary.dropped, summary.written = summary.written - writer.written, writer.written
        if stop.requested:
            summary.interrupted = stop.signal.name
        my_keys = {source.key for source in run.my_sources}
        failed_now = (summary.failed_keys & my_keys) - set(run.settled)
        expected = run.samples_to_do - sum(per_source - done[key] for key in failed_now)
        if not stop.requested and summary.written == expected:
            finish_shard(out, plan, summary.failed_keys & my_keys)
    return summary


def stop_message(received: signal.Signals) -> str:
    """What a run prints the moment a stop signal arrives."""
    again = " (Ctrl-C again to stop at once)" if received == signal.SIGINT else ""
    return f"{received.name}: stopping after this batch…{again}"


def _sample_all(
    run: RunPlan,
    pipeline: MDSD3Pipeline,
    writer: LayoutWriter,
    summary: RunSummary,
    stop: StopRequest,
    console: rich.console.Console,
    on_failure: Callable[[FailedInput], None],
) -> None:
    """Decode, sample and submit every sample of `run.todo()` (one source image's samples built at a time), counting
    into `summary`; inputs that cannot be decoded go to `on_failure`."""
    recipe, sampling = run.recipe, run.recipe.sampling
    pipeline.embed(needed_prompts((item.request for item in run.todo()), pipeline.classes, sampling.guidance))
    per_source, done = recipe.samples_per_input(), run.done_per_key()
    sources = [
        source
        for source in sorted(run.my_sources, key=lambda source: source.key)
        if done[source.key] < per_source and source.key not in run.settled
    ]

    def failed(source: Source, reason: str) -> None:
        on_failure(FailedInput(source.key, str(source.path), reason))
        progress.total -= per_source - done[source.key]

    with RunProgress(run.samples_to_do, f"generate {run.shard.name}", console=console) as progress:
        loaded = iter_loaded(
            sources,
            lambda source: load_input(source.path, recipe.input),
            workers=recipe.input.workers,
            prefetch=4 * sampling.batch_size,
        )
        for batch in _batches(loaded, run.todo_of, lambda: pipeline.batch_size, failed, stop):
            tick = time.perf_counter()
            degraded = pipeline(
                [(item.request, image.pixels) for item, image in batch], sampling.steps, sampling.guidance
            )
            summary.sampler_s += time.perf_counter() - tick
            for (item, image), output in zip(batch, degraded):
                writer.submit(_record(item, image, run, pipeline), image.pixels, output)
            summary.written += len(batch)
            progress.advance(len(batch))
        writer.drain()
    summary.batch_size = pipeline.batch_size


def describe_plan(run: RunPlan) -> Table:
    """The plan's size, for `check` and `--dry-run`."""
    recipe = run.recipe
    table = Table(title=escape(f"plan for {recipe.source_path.name} — {run.shard.name}"), show_header=False)
    folders = [
        variant.name if variant.repeats == 1 else f"{variant.folder(1)} ... {variant.folder(variant.repeats)}"
        for variant in recipe.variants
    ]
    nonfatal = [error for error in run.discovery.errors if not error.fatal]
    rows = [
        ("input images", len(run.discovery.sources)),
        ("inputs skipped at discovery", len(nonfatal)),
        *([(f"in plan (--limit {run.limit})", run.sources_in_plan)] if run.limit is not None else []),
        ("variant folders", ", ".join(folders)),
        ("samples in plan", run.samples_in_plan),
        ("samples in this shard", run.samples_in_shard),
        ("already done", run.samples_in_shard - run.samples_to_do),
        ("to do", run.samples_to_do),
        ("classes", ", ".join(recipe.classes())),
        ("output", str(recipe.output_dir())),
        *(("note", note) for note in run.discovery.notes),
    ]
    for name, value in rows:
        table.add_row(name, escape(str(value)))
    return table


def predicted_failures(run: RunPlan, console: rich.console.Console | None = None) -> list[FailedInput]:
    """The inputs `generate` would record as failed (`check --decode`): the files discovery drops, then every
    source of this shard that does not decode, found by decoding each one as `generate` does (nothing written)."""
    return discovery_failures(run.discovery) + decode_failures(run.recipe, run.my_sources, console)


def estimated_output_bytes(run: RunPlan) -> int:
    """A generous estimate of what the remaining work writes: every image at its raw RGB size, plus 1 KB of
    manifest per sample (PNG at compression level 1 rarely beats raw by much on photos)."""
    recipe = run.recipe
    _, side = recipe.input.largest_side()
    per_source = recipe.samples_per_input()
    done = run.done_per_key()
    new_keys = sum(1 for source in run.my_sources if done[source.key] < per_source)
    return (run.samples_to_do + new_keys) * (side * side * 3 + 1024)


def free_space_warning(run: RunPlan, free_bytes: int | None = None) -> str | None:
    """A warning when the output disk has less free space than the plan may need (None when it has enough)."""
    folder = run.recipe.output_dir()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free if free_bytes is None else free_bytes
    needed = estimated_output_bytes(run)
    if free >= needed:
        return None
    return (
        f"only {free / 1e6:,.0f} MB free on the disk of {run.recipe.output_dir()}; the remaining "
        f"{run.samples_to_do} samples may need up to {needed / 1e6:,.0f} MB"
    )


def check_output_writable(path: Path, source: str | os.PathLike) -> None:
    """Raise OSError naming the recipe `source` and output.dir if outputs cannot be created at `path`."""
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OSError(f"{source}: output.dir: {probe_dir} is not a folder (output.dir is {path})")
    try:
        descriptor, probe = tempfile.mkstemp(dir=probe_dir, prefix=".mdsd3-write-test-")
    except OSError as error:
        raise OSError(
            f"{source}: output.dir: cannot write in {probe_dir}: {error.strerror} (output.dir is {path})"
        ) from error
    os.close(descriptor)
    os.unlink(probe)
