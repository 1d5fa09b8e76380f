"""`evaluate_dataset`: open the sets, measure every pair on worker processes (streaming the per-sample CSV),
then aggregate into a `Report`."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from mdsd3_cli.util.progress import RunProgress

from .aggregate import SampleTable, compare, summarise
from .estimators import DEFAULT_SEAM_GRID
from .pairs import EvaluateError, PairSource, Problem, match_folders, open_dataset
from .report import Report, SampleCsv
from .runner import measure_groups


class EvaluateStopped(Exception):
    """SIGTERM arrived while measuring: the workers were stopped and samples.csv left as it was."""

    exit_code = 128 + signal.SIGTERM


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """While measuring (main thread only), SIGTERM raises EvaluateStopped instead of killing the process at once,
    so the workers are terminated and the temp files removed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise EvaluateStopped("evaluate stopped by SIGTERM; nothing was written")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _measure(
    source: PairSource, workers: int, csv: SampleCsv | None, console: Console | None, seam_grid: int
) -> SampleTable:
    table = SampleTable(source.classes)
    with RunProgress(source.sample_count, f"evaluate {source.label}", unit="pairs", console=console) as progress:
        for result in measure_groups(source.groups, min(workers, max(1, len(source.groups))), seam_grid):
            table.add(result)
            source.problems.extend(result.problems)
            if csv is not None:
                csv.write(source.label, table, len(result.measured))
            progress.advance(result.attempted)
    return table


def evaluate_dataset(
    dataset: Path | None = None,
    pairs: tuple[Path, Path] | None = None,
    against: list[Path] | tuple[Path, ...] = (),
    out_dir: Path | None = None,
    workers: int | None = None,
    console: Console | None = None,
    seam_grid: int = DEFAULT_SEAM_GRID,
) -> Report:
    """Measure `dataset` (an mdsd3 output, or a folder with clean/ and degraded/) or `pairs` (clean folder,
    degraded folder), and each `against` set. With `out_dir`, the per-sample table is streamed to
    OUT_DIR/samples.csv (report.json and plots are written by `write_report`). `seam_grid`: the grid (pixels)
    of the seam measure, the generating model's token size. EvaluateError when the dataset has no usable pair;
    EvaluateStopped when SIGTERM arrives while measuring."""
    if (dataset is None) == (pairs is None):
        raise EvaluateError("give either a dataset folder or a (clean, degraded) folder pair")
    if seam_grid < 2:
        raise EvaluateError(f"the seam grid is at least 2 pixels, got {seam_grid}")
    workers = workers or os.cpu_count() or 1
    inputs = [Path(dataset)] if dataset is not None else [Path(pairs[0]), Path(pairs[1])]
    if out_dir is not None:
        _refuse_out_inside_inputs(Path(out_dir), [*inputs, *map(Path, against)])
    main = open_dataset(inputs[0]) if dataset is not None else match_folders(*inputs)
    others = [open_dataset(Path(path)) for path in against]
    _unique_labels([main, *others])
    for source in (main, *others):
        if source.sample_count == 0:
            raise EvaluateError(f"{source.label}: no pairs to evaluate" + _first_problems(source.problems))
    csv = SampleCsv(Path(out_dir) / "samples.csv", [main, *others]) if out_dir is not None else None
    try:
        with _stop_on_sigterm():
            tables = {source.label: _measure(source, workers, csv, console, seam_grid) for source in (main, *others)}
    except BaseException:
        if csv is not None:
            csv.discard()
        raise
    if csv is not None:
        csv.close()
    for source in (main, *others):
        if len(tables[source.label]) == 0:
            raise EvaluateError(
                f"{source.label}: none of its {source.sample_count} pairs could be read"
                + _first_problems(source.problems)
            )
    main_table = tables[main.label]
    return Report(
        summary=summarise(main_table, main.label),
        against=[summarise(tables[source.label], source.label) for source in others],
        distances={source.label: compare(main_table, tables[source.label]) for source in others},
        problems=[problem for source in (main, *others) for problem in source.problems],
        tables=tables,
        seam_grid=seam_grid,
    )


def _refuse_out_inside_inputs(out_dir: Path, inputs: list[Path]) -> None:
    """EvaluateError when the report folder is an input folder or lies inside one (links resolved): its plots
    would be read as images by the next run."""
    out = out_dir.expanduser().resolve()
    for folder in inputs:
        folder_resolved = folder.expanduser().resolve()
        if out.is_relative_to(folder_resolved):
            raise EvaluateError(
                f"--out {out_dir} is inside the input folder {folder} (its plots would be read as "
                "images by the next run); choose a report folder outside the inputs"
            )


def _unique_labels(sources: list[PairSource]) -> None:
    """Sets with one folder name get numbered labels (name, name-2, ...)."""
    seen: dict[str, int] = {}
    for source in sources:
        count = seen.get(source.label, 0) + 1
        seen[source.label] = count
        if count > 1:
            source.label = f"{source.label}-{count}"


def _first_problems(problems: list[Problem], limit: int = 3) -> str:
    if not problems:
        return ""
    listed = "; ".join(f"{problem.path}: {problem.reason}" for problem in problems[:limit])
    return f" ({len(problems)} problem(s), e.g. {listed})"
