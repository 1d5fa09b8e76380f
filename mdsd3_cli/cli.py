"""The `mdsd3` command line: a thin Typer layer over the library."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mdsd3_cli.util.progress import Console  # tables in full off a terminal
from mdsd3_cli.util.version import __version__

if TYPE_CHECKING:
    from mdsd3_cli.generate.run import RunPlan
    from mdsd3_cli.pipeline.inputs import FailedInput

app = typer.Typer(
    help="Paired clean/degraded image datasets from a masked Stable Diffusion 3 transformer.\n\n"
    "Start with `mdsd3 init recipe.yaml`, edit it, `mdsd3 check --config recipe.yaml`, then "
    "`mdsd3 generate --config recipe.yaml`. Rerunning a stopped run finishes it.",
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True)
EXIT_USAGE = 2
PREVIEW_PROBLEMS_SHOWN = 20

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Recipe YAML file.", show_default=False)]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override one recipe field, e.g. --set sampling.steps=20 (repeatable).", show_default=False
    ),
]


def _error(message: object) -> None:
    """One red error line; the message (paths, YAML excerpts, values) is printed verbatim, never as markup."""
    console.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def _show_version(value: bool) -> None:
    if value:
        print(f"mdsd3 {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def main(
    context: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    # No docstring: the app's help text above is the one `mdsd3 --help` shows.
    if context.invoked_subcommand is None:
        print(context.get_help())
        raise typer.Exit()


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


@contextmanager
def _clear_errors():
    """Known user errors (and a diverged training loss) become one red message and exit status 2. Every error type
    mdsd3 raises for bad input is a ValueError or an OSError, except the output-folder conflicts (imported from the
    light `run_record` module, so a command that needs no model does not load torch for this)."""
    from mdsd3_cli.dataset.run_record import OutputConflictError

    try:
        yield
    except (OutputConflictError, OSError, ValueError, FloatingPointError) as error:
        _error(error)
        raise typer.Exit(EXIT_USAGE) from None


def _load(config: Path, overrides: list[str] | None):
    from mdsd3_cli.recipe.generate import load_recipe

    return load_recipe(config, overrides or [])


@app.command()
def generate(
    config: ConfigOption,
    overrides: SetOption = None,
    shard_index: Annotated[
        int | None,
        typer.Option(
            help="This process's shard (0-based). Default: from SLURM_ARRAY_TASK_ID and/or torchrun's RANK, else 0."
        ),
    ] = None,
    num_shards: Annotated[
        int | None,
        typer.Option(help="Total shards. Default: from SLURM_ARRAY_TASK_COUNT and/or WORLD_SIZE, else 1."),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N input images (sorted by key).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and exit; load no model.")] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Delete the files this output folder's manifests "
            "list (nothing else) and redo everything (default: resume, skipping finished samples).",
        ),
    ] = False,
) -> None:
    """Generate the paired dataset a recipe describes (resumes).

    Writes OUT/clean/<key>, OUT/degraded/<variant>/<key> (with output.layout webdataset: OUT/tars/<shard>-N.tar,
    one sample per key holding its clean image once), OUT/manifest/<shard>.jsonl, OUT/errors/<shard>.jsonl and
    OUT/run.json. Exit status: 0 all done, 1 some inputs failed (the first few are printed with their reasons; all
    are in OUT/errors/<shard>.jsonl), 2 bad recipe or usage, or an output problem (a folder mdsd3 did not make,
    another process on this shard, a full disk), 130/143 stopped by SIGINT/SIGTERM after the batch in progress (a
    second Ctrl-C stops at once; rerun to finish).
    """
    _quiet_libraries()
    from mdsd3_cli.generate.plan import detect_shard
    from mdsd3_cli.generate.run import describe_plan, plan_run, preflight_output, run_generate
    from mdsd3_cli.recipe.generate import start_warning
    from mdsd3_cli.recipe.presets import trained_range_warnings
    from mdsd3_cli.util.runtime import exit_code_for

    with _clear_errors():
        recipe = _load(config, overrides)
        for warning in (start_warning(recipe), *trained_range_warnings(recipe)):
            _warn(warning)
        shard = detect_shard(shard_index, num_shards, os.environ)
        run = plan_run(recipe, shard, limit)
        if dry_run:
            preflight_output(run, overwrite)  # what generate would refuse, refused the same way
            Console().print(describe_plan(run))
            return
        try:
            summary = run_generate(run, overwrite=overwrite, console=console)
        except KeyboardInterrupt:  # a second Ctrl-C (or one before the run could stop cleanly)
            console.print(
                "[yellow]stopped at once[/]: the samples already written are kept and listed; rerun the "
                "same command to finish",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(exit_code_for("SIGINT")) from None
    Console().print(summary.table())
    if summary.failed_inputs:
        _list_failed(summary.failures, summary.failed_inputs)
        console.print(
            f"every failed input and its reason: {escape(str(summary.errors_file))}", highlight=False, soft_wrap=True
        )
    raise typer.Exit(summary.exit_code)


def _list_failed(failures: list[FailedInput], total: int) -> None:
    """One red line per failed input (path: reason), then how many more there are than `failures` holds."""
    for failure in failures:
        console.print(
            f"[red]failed[/] {escape(failure.path)}: {escape(failure.reason)}", highlight=False, soft_wrap=True
        )
    if total > len(failures):
        console.print(f"[red]failed[/] ... and {total - len(failures)} more", highlight=False)


@app.command()
def check(
    config: ConfigOption,
    overrides: SetOption = None,
    decode: Annotated[
        bool,
        typer.Option(
            "--decode",
            help="Also decode every input as generate will (a progress "
            "bar; nothing written) and list those that would fail, with the reason.",
        ),
    ] = False,
) -> None:
    """Validate a recipe and print its plan; loads no model.

    A generate recipe: fields, classes against the adapter, base folder layout, device, inputs, output (empty or
    made by mdsd3; free space), planned for the shard SLURM_ARRAY_TASK_ID/COUNT or torchrun's RANK/WORLD_SIZE give
    this process, as generate --dry-run plans it; with --decode, every input is decoded too. A training recipe (it
    has `datasets`): fields, base folder layout, device, every dataset's pairs, output. Exit status: 0 valid (and,
    with --decode, every input decodes), 1 valid but some inputs would fail (listed; generate would skip them and
    exit 1), 2 bad recipe or usage.
    """
    from mdsd3_cli.recipe.file import read_recipe, recipe_kind

    with _clear_errors():
        if recipe_kind(read_recipe(config).data) == "train":
            if decode:
                raise ValueError(
                    f"{config}: --decode checks a generate recipe's inputs; training pairs are checked without it"
                )
            plan, warnings, run = _check_training(config, overrides), [], None
        else:
            run, plan, warnings = _check_generate(config, overrides)
    Console().print(plan)
    for warning in warnings:
        _warn(warning)
    console.print(f"[green]ok:[/] {escape(str(config))} is valid", highlight=False, soft_wrap=True)
    if decode and run is not None:
        _check_decoding(run)


def _check_decoding(run: RunPlan) -> None:
    """`check --decode`: list the inputs generate would fail and exit 1 when there are any."""
    from mdsd3_cli.generate.run import EXIT_FAILED_INPUTS, predicted_failures
    from mdsd3_cli.pipeline.inputs import discovery_failures

    failures = predicted_failures(run, console)
    _list_failed(failures, len(failures))
    if failures:
        inputs = len(run.my_sources) + len(discovery_failures(run.discovery))
        console.print(
            f"[red]{len(failures)} of {inputs} inputs would fail[/] (listed above): generate skips them, "
            "records them in errors/ and exits 1",
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED_INPUTS)
    console.print(f"[green]ok:[/] all {len(run.my_sources)} inputs decode", highlight=False)


def _warn(message: str | None) -> None:
    """One yellow warning line (nothing for None); the message is printed verbatim, never as markup."""
    if message is not None:
        console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _check_generate(config: Path, overrides: list[str] | None) -> tuple[RunPlan, Table, list[str]]:
    from mdsd3_cli.dataset.run_record import OutputConflictError
    from mdsd3_cli.generate.plan import detect_shard
    from mdsd3_cli.generate.run import (
        check_output_writable,
        describe_plan,
        free_space_warning,
        plan_run,
        preflight_output,
    )
    from mdsd3_cli.recipe.generate import start_warning
    from mdsd3_cli.recipe.presets import trained_range_warnings

    recipe = _load(config, overrides)
    recipe.device()
    run = plan_run(recipe, detect_shard(None, None, os.environ))  # this task's shard, as generate would take it
    try:
        preflight_output(run)
    except OutputConflictError as error:
        raise OutputConflictError(f"{config}: output.dir: {error}") from None
    check_output_writable(recipe.output_dir(), config)
    warnings = [start_warning(recipe), *trained_range_warnings(recipe), free_space_warning(run)]
    return run, describe_plan(run), [warning for warning in warnings if warning]


def _check_training(config: Path, overrides: list[str] | None) -> Table:
    from mdsd3_cli.generate.run import check_output_writable
    from mdsd3_cli.recipe.train import load_train_recipe
    from mdsd3_cli.train.data import build_dataset
    from mdsd3_cli.train.summary import describe_training

    recipe = load_train_recipe(config, overrides or [])
    recipe.device()
    dataset = build_dataset(recipe)
    check_output_writable(recipe.output.dir, config)
    return describe_training(recipe, dataset)


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the example recipe.")] = Path("recipe.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="Write a recipe that runs this shipped model "
            "as the demo does (model, size, steps, alpha/beta, grid_shifts, guidance): mini.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Write a commented example recipe to edit.

    A link at PATH counts as an existing file: --force replaces the link itself (atomically), never the file it
    points to."""
    from mdsd3_cli.recipe.generate import example_recipe_text
    from mdsd3_cli.recipe.presets import preset_recipe_text
    from mdsd3_cli.util.atomic import atomic_write

    with _clear_errors():
        text = example_recipe_text() if preset is None else preset_recipe_text(preset, path.name)
    if path.is_dir():
        _error(f"{path} is a folder; give a file name, e.g. {path / 'recipe.yaml'}")
        raise typer.Exit(EXIT_USAGE)
    if os.path.lexists(path) and not force:
        link = " (a symbolic link)" if path.is_symlink() else ""
        _error(f"{path} exists{link}; use --force to replace it")
        raise typer.Exit(EXIT_USAGE)
    if not path.parent.is_dir():
        _error(f"cannot write {path}: folder {path.parent} does not exist")
        raise typer.Exit(EXIT_USAGE)
    with _clear_errors():
        atomic_write(path, text.encode("utf-8"))
    console.print(
        f"wrote {escape(str(path))}; edit input.paths and output.dir, then: mdsd3 check --config {escape(str(path))}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("encode-prompts")
def encode_prompts(config: ConfigOption, overrides: SetOption = None) -> None:
    """Fill the prompt cache (run once before array jobs).

    Encodes every prompt the recipe's classes can need into the prompt cache, so that no task of an array job
    loads the text encoders."""
    _quiet_libraries()
    from mdsd3_cli.model.heads import all_prompts
    from mdsd3_cli.model.prompts import PromptCache, load_prompt_embeddings
    from mdsd3_cli.model.weights import fingerprint_base
    from mdsd3_cli.util.runtime import resolve_dtype

    with _clear_errors():
        recipe = _load(config, overrides)
        source = recipe.model.base if recipe.base_dir() is None else str(recipe.base_dir())
        fingerprint = fingerprint_base(source)
        prompts = all_prompts(recipe.classes())
        cache = PromptCache(recipe.prompt_cache_dir(), fingerprint)
        missing = cache.missing(prompts)
        device = recipe.device()
        load_prompt_embeddings(
            source, fingerprint, prompts, recipe.prompt_cache_dir(), device, resolve_dtype(recipe.model.dtype, device)
        )
    console.print(
        f"{len(prompts)} prompts cached in {escape(str(cache.folder))} ({len(missing)} newly encoded)",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def info(config: ConfigOption, overrides: SetOption = None) -> None:
    """Model and adapter summary: classes, heads, parameters.

    Classes, head partition, parameter counts and fingerprints of the recipe's base and adapter."""
    _quiet_libraries()
    import torch

    from mdsd3_cli.model.weights import PARAMETER_GROUPS, describe_parameters
    from mdsd3_cli.pipeline.pipeline import MDSD3Pipeline

    with _clear_errors():
        recipe = _load(config, overrides)
        pipeline = MDSD3Pipeline.from_recipe(recipe, torch.device("cpu"), torch.float32)
    table = Table(title="mdsd3 model", show_header=False)
    adapter = pipeline.adapter
    table.add_row("base", escape(f"{pipeline.base.source} ({pipeline.base.fingerprint})"))
    table.add_row(
        "adapter", escape(f"{recipe.model.adapter or 'fresh (untrained)'} ({pipeline.adapter_fingerprint or '-'})")
    )
    table.add_row("shape", ", ".join(f"{k}={v}" for k, v in pipeline.base.shape.items()))
    for name, heads in zip(adapter.classes, adapter.head_partition):
        table.add_row(f"class {escape(name)}", f"heads {heads[0]}-{heads[-1]} ({len(heads)})")
    counts = describe_parameters(pipeline.model)
    for name, count in counts.items():
        table.add_row(f"parameters: {PARAMETER_GROUPS[name]}", f"{count:,}")
    table.add_row("parameters: total", f"{sum(counts.values()):,}")
    Console().print(table)


@app.command()
def train(
    config: ConfigOption,
    overrides: SetOption = None,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="`latest` (newest checkpoint in OUT/checkpoints; "
            "a fresh start when there is none) or a checkpoint folder.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train an adapter from clean/degraded pairs.

    One process, or several under `accelerate launch` / torchrun. Writes OUT/log.jsonl, OUT/checkpoints/step-N/,
    OUT/previews/step-N.png and, when finished, OUT/adapter/. SIGTERM/SIGINT/SIGUSR1 save a checkpoint and stop.
    Exit status: 0 finished, 2 bad recipe or usage, 130/143/138 stopped by SIGINT/SIGTERM/SIGUSR1 (rerun with
    --resume latest to continue); a full disk or another training process on OUT is exit 2 too.
    """
    _quiet_libraries()
    from mdsd3_cli.recipe.train import load_train_recipe
    from mdsd3_cli.train.run import open_training, plan_training, train

    with _clear_errors():  # recipe, data, checkpoint and adapter errors are ValueErrors
        plan = plan_training(load_train_recipe(config, overrides or []), resume)
        with open_training(plan, console=console) as state:
            summary = train(state)
    if state.accelerator.is_main_process:
        Console().print(summary.table())
    raise typer.Exit(summary.exit_code)


@app.command()
def preview(
    dataset: Annotated[Path, typer.Option("--dataset", help="A generate output folder.", show_default=False)],
    n: Annotated[int, typer.Option("--n", min=1, help="Rows (randomly chosen keys).")] = 16,
    out: Annotated[Path, typer.Option("--out", help="PNG to write.")] = Path("preview.png"),
    seed: Annotated[int, typer.Option(help="Which keys are chosen.")] = 0,
    cell: Annotated[int, typer.Option(min=32, help="Thumbnail size in pixels.")] = 192,
) -> None:
    """A contact sheet: each key's clean image and variants.

    One row per key, the clean image then each variant, labelled with its ratios. Records and images that
    cannot be shown are skipped and listed. A link at --out is replaced by the sheet, never followed; another
    mdsd3 process writing --out makes it stop (exit status 2)."""
    from mdsd3_cli.dataset.preview import contact_sheet, save_sheet
    from mdsd3_cli.util.output_lock import OutputLock

    problems: list[str] = []
    with _clear_errors(), OutputLock(out, "output"):
        sheet = contact_sheet(dataset, n, cell, seed, problems)
        save_sheet(sheet, out)
    for problem in problems[:PREVIEW_PROBLEMS_SHOWN]:
        console.print(f"[yellow]skipped[/] {escape(problem)}", highlight=False, soft_wrap=True)
    if len(problems) > PREVIEW_PROBLEMS_SHOWN:
        console.print(f"[yellow]skipped[/] ... and {len(problems) - PREVIEW_PROBLEMS_SHOWN} more", highlight=False)
    console.print(f"wrote {escape(str(out))} ({sheet.width}x{sheet.height})", highlight=False, soft_wrap=True)


@app.command()
def verify(
    dataset: Annotated[
        Path,
        typer.Option(
            "--dataset", help="A generate output folder (any layout), or an export's destination.", show_default=False
        ),
    ],
    workers: Annotated[
        int | None, typer.Option(min=1, help="Hashing threads (default: one per CPU core).", show_default=False)
    ] = None,
) -> None:
    """Check that a dataset or an export is finished and intact.

    The run is finished (every shard, no generate writing it); every manifest record's files exist, decode, and
    have the recorded size and SHA-256; every key has all variants; no file lacks a record (orphans). An
    export's destination (webdataset, lmdb, parquet) is checked against its own metadata.

    Exit status: 0 no problem, 1 problems found (listed; an unfinished run or a --partial export is one), 2 not a
    dataset.
    """
    from mdsd3_cli.dataset.names import is_generate_output
    from mdsd3_cli.dataset.verify import NotADatasetError, print_problems, verify_dataset
    from mdsd3_cli.export.check import export_format, verify_export

    try:
        if not is_generate_output(dataset) and export_format(dataset) is not None:
            report = verify_export(dataset)
        else:
            report = verify_dataset(dataset, workers, console=console)
    except (NotADatasetError, OSError) as error:
        _error(error)
        raise typer.Exit(EXIT_USAGE) from None
    print_problems(report, console)
    Console().print(report.table())
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def evaluate(
    dataset: Annotated[
        Path | None,
        typer.Option(
            "--dataset",
            metavar="DIR",
            help="An mdsd3 generate output "
            "folder (read through its manifest/, every shard, finished or partial), or a folder holding clean/ and "
            "degraded/ matched by relative path.",
            show_default=False,
        ),
    ] = None,
    pairs: Annotated[
        tuple[Path, Path] | None,
        typer.Option(
            "--pairs",
            metavar="CLEAN_DIR DEGRADED_DIR",
            help="Instead of --dataset: a clean folder and a degraded folder, images matched by relative "
            "path without extension (e.g. a RESIDE or Rain100 copy).",
            show_default=False,
        ),
    ] = None,
    against: Annotated[
        list[Path] | None,
        typer.Option(
            "--against",
            metavar="DIR",
            help="A set to compare with (an mdsd3 output, or a folder with clean/ and degraded/); repeatable.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Report folder: report.json, samples.csv and plots.")] = Path(
        "evaluate_report"
    ),
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", min=1, help="Processes measuring pairs. Default: the number of CPUs.", show_default=False
        ),
    ] = None,
    seam_grid: Annotated[
        int,
        typer.Option(
            "--seam-grid",
            min=2,
            help="Grid (pixels) of the seam measure: the generating model's token size (mini 8, SD3 16).",
        ),
    ] = 8,
) -> None:
    """Measure the degradations a dataset actually contains.

    PSNR/SSIM per pair, the seam ratio (steps across the --seam-grid lines over steps elsewhere, relative to
    the clean image's: about 1.0 without a token mosaic), each class's strength by a classical estimator
    (noise, haze, rain, low_light, blur), monotonicity against the requested ratios, selectivity of
    single-class variants (own move over the largest rise of another class), diversity between repeats, and
    distances to --against sets.

    Prints tables and writes report.json, samples.csv and plots (*.png) to the --out folder. Unreadable files
    are listed, not fatal. Exit status: 0 done, 2 nothing to evaluate or bad usage (or another mdsd3 process
    writing --out), 143 stopped by SIGTERM (nothing written).
    """
    from .evaluate import evaluate_dataset, write_report
    from .evaluate.report import classes_table, distances_table, problem_lines, variants_table
    from .evaluate.run import EvaluateStopped
    from .util.output_lock import OutputLock

    if (dataset is None) == (pairs is None):
        _error("give exactly one of --dataset DIR or --pairs CLEAN_DIR DEGRADED_DIR")
        raise typer.Exit(EXIT_USAGE)
    try:
        with _clear_errors(), OutputLock(out, "output"):
            report = evaluate_dataset(dataset, pairs, against or [], out, workers, console, seam_grid)
            written = write_report(report, out)
    except EvaluateStopped as stopped:
        _error(stopped)
        raise typer.Exit(stopped.exit_code) from None
    terminal = Console()
    terminal.print(variants_table(report.summary))
    if report.summary["monotonicity"]:
        terminal.print(classes_table(report.summary))
    for label, distances in report.distances.items():
        terminal.print(distances_table(label, distances))
    for line in problem_lines(report):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(
        f"wrote {escape(str(out / 'samples.csv'))}, " + ", ".join(escape(path.name) for path in written),
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def calibrate(
    config: ConfigOption,
    reference: Annotated[
        Path,
        typer.Option(
            "--reference",
            metavar="DIR",
            help="The paired set to match: an mdsd3 "
            "output, a folder with clean/ and degraded/<class>/ (one folder per class), or clean/ and "
            "degraded/ holding one set (name its classes with --classes); images matched by name.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="The calibrated recipe to write; <stem>.report.json and <stem>.png go beside it.",
            show_default=False,
        ),
    ],
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes",
            metavar="A,B",
            help="Classes to calibrate, comma-separated. Default: every class a variant uses.",
            show_default=False,
        ),
    ] = None,
    probe: Annotated[int, typer.Option("--probe", min=1, help="Probe photos taken from the recipe's inputs.")] = 4,
    grid: Annotated[int, typer.Option("--grid", min=2, help="Ratios swept per class, evenly from 0 to 1.")] = 5,
    check: Annotated[
        int,
        typer.Option(
            "--check",
            min=0,
            help="Samples per class in each check set (as given, calibrated); 0 skips the verification.",
        ),
    ] = 16,
    overrides: SetOption = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the output recipe, report and plot if they exist.")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="Processes measuring the reference. Default: the number of CPUs.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Fit a recipe's class ratios to a reference set's strengths.

    Measures each class's strength distribution in the reference (evaluate's estimators; docs/calibrate.md), sweeps
    each class's ratio on --probe photos of the recipe's inputs, inverts the strength(ratio) curve by quantile
    mapping into a per-sample ratio distribution ({quantiles: [...]}) for every variant using the class, and
    verifies on check sets made with the recipe as given and as calibrated (1-Wasserstein distance to the
    reference). A class the reference lacks, or whose strength the model does not move clearly, is reported and left
    as given. Exit status: 0 every class calibrated, 1 recipe written but some classes left as given (listed), 2 bad
    recipe, reference or usage (nothing written).
    """
    _quiet_libraries()
    from mdsd3_cli.calibrate import EXIT_LEFT_AS_GIVEN, EXIT_OK
    from mdsd3_cli.calibrate import calibrate as run_calibration
    from mdsd3_cli.calibrate.report import summary_table
    from mdsd3_cli.util.output_lock import OutputLock

    names = None if classes is None else [name.strip() for name in classes.split(",") if name.strip()]
    with _clear_errors(), OutputLock(out, "output"):
        report = run_calibration(
            config, reference, out, names, probe, grid, check, overrides or [], overwrite, workers, console
        )
    Console().print(summary_table(report))
    for problem in report.problems:
        console.print(f"[yellow]left out[/] {escape(problem)}", highlight=False, soft_wrap=True)
    for result in report.classes:
        if result.curve is not None and result.curve.decreasing:
            spans = ", ".join(f"{low:g}-{high:g}" for low, high in result.curve.decreasing)
            _warn(
                f"{result.name}: the model's median strength falls between ratios {spans} (not monotone; the "
                "inversion uses its monotone fit)"
            )
        if result.above_range:
            _warn(
                f"{result.name}: {result.above_range:.0%} of the reference is stronger than the model makes at ratio 1 "
                "(mapped to ratio 1)"
            )
    console.print("wrote " + ", ".join(escape(path) for path in report.files), highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_LEFT_AS_GIVEN if report.left_as_given else EXIT_OK)


@app.command()
def export(
    dataset: Annotated[
        Path, typer.Option("--dataset", help="A finished generate output folder (either layout).", show_default=False)
    ],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="webdataset (tar shards), lmdb (BasicSR's paired LMDB) or parquet (Hugging Face datasets).",
            show_default=False,
        ),
    ],
    destination: Annotated[Path, typer.Argument(help="Folder to create (must not exist).", show_default=False)],
    per_file: Annotated[
        int | None,
        typer.Option(
            "--per-file",
            min=1,
            help="Keys per tar (webdataset, default 200: "
            "one sample per key, its clean image and every variant) or pairs "
            "per Parquet file (default 1000).",
            show_default=False,
        ),
    ] = None,
    partial: Annotated[
        bool, typer.Option("--partial", help="Export an unfinished run's complete keys; the output is marked partial.")
    ] = False,
    one_lq: Annotated[
        bool,
        typer.Option(
            "--one-lq",
            help="lmdb: one DEST/lq.lmdb for every variant (keys "
            "<key>/<variant>; gt.lmdb holds the clean image under the same keys), "
            "one BasicSR PairedImageDataset for all.",
        ),
    ] = False,
) -> None:
    """Convert a finished dataset for large-scale trainers.

    `lmdb` writes DEST/gt.lmdb and DEST/lq_<variant>.lmdb, each with BasicSR's meta_info.txt; `webdataset` writes
    DEST/data-000000.tar, ... (one sample per key: .clean.png once, .<variant>.degraded.png each, .json); `parquet` writes
    DEST/data-00000.parquet, ... (one row per pair). The destination appears only when complete, one export per
    destination; an interrupted export may leave a `.DEST.<random>.partial` sibling (safe to delete). An unfinished
    run is refused unless --partial. Exit status: 0 done, 2 unusable input (docs/export.md).
    """
    from mdsd3_cli.export.formats import EXPORT_FORMATS
    from mdsd3_cli.export.run import run_export
    from mdsd3_cli.util.names import closest_name

    if to not in EXPORT_FORMATS:
        guess = closest_name(to, EXPORT_FORMATS)
        _error(
            f"--to {to}: expected one of {', '.join(EXPORT_FORMATS)}" + (f"; did you mean '{guess}'?" if guess else "")
        )
        raise typer.Exit(EXIT_USAGE)
    with _clear_errors():
        summary = run_export(dataset, to, destination, per_file, console=console, partial=partial, one_lq=one_lq)
    Console().print(summary.table())
