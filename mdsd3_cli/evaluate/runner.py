"""Measure pair groups, in order, on worker processes: images are decoded and measured inside the workers,
so the parent holds only the numbers (constant memory in the number of images)."""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np

from mdsd3_cli.dataset.stored_images import ImageRef
from mdsd3_cli.util.images import DEFAULT_MAX_PIXELS, MIN_SIDE, ImageError

from .estimators import DEFAULT_SEAM_GRID, Reference, repeat_diversity
from .measures import measure_pair
from .pairs import PairGroup, Problem, Sample

MIN_MEASURED_SIDE = MIN_SIDE
"""Smallest image side measured: the estimators' windows (SSIM 7, photometric-fit blocks 8) need room; a smaller
pair is left out with the reason instead of giving an error or NaN."""
_MALLOC_OPTIONS = {-3: 32 << 20, -1: 1 << 30, -2: 64 << 20}
"""glibc `mallopt` settings: M_MMAP_THRESHOLD 32 MiB (its maximum), M_TRIM_THRESHOLD 1 GiB, M_TOP_PAD 64 MiB."""


@dataclass(frozen=True)
class MeasuredSample:
    """One measured degraded image."""

    sample: Sample
    measures: dict[str, float]


@dataclass(frozen=True)
class GroupResult:
    """The measured images of one group, the repeat diversity of each variant with two or more readable repeats,
    and what failed."""

    group: PairGroup
    measured: tuple[MeasuredSample, ...]
    diversity: dict[str, float]
    problems: tuple[Problem, ...]

    @property
    def attempted(self) -> int:
        return len(self.group.samples)


def read_rgb(source: ImageRef) -> np.ndarray:
    """Decode an image to uint8 RGB [H, W, 3] through the readers' one decoding path (`ImageRef.read_rgb`);
    ImageError with the reason."""
    return np.asarray(source.read_rgb(DEFAULT_MAX_PIXELS, MIN_MEASURED_SIDE))


def measure_group(group: PairGroup, seam_grid: int = DEFAULT_SEAM_GRID) -> GroupResult:
    """Decode the clean image once, then each degraded image; measure each pair (seams on a `seam_grid`-pixel
    grid); diversity across each variant's readable repeats."""
    try:
        clean = read_rgb(group.clean)
    except ImageError as error:
        problem = Problem(str(group.clean), f"clean image: {error.reason} (skipped {len(group.samples)} pair(s))")
        return GroupResult(group, (), {}, (problem,))
    reference = Reference(clean)
    measured, problems = [], []
    variants = [sample.variant for sample in group.samples]
    repeats: dict[str, list[np.ndarray]] = {variant: [] for variant in variants if variants.count(variant) > 1}
    for sample in group.samples:
        try:
            degraded = read_rgb(sample.image)
        except ImageError as error:
            problems.append(Problem(str(sample.image), error.reason))
            continue
        if degraded.shape != clean.shape:
            problems.append(
                Problem(
                    str(sample.image),
                    f"size {degraded.shape[1]}x{degraded.shape[0]} differs from "
                    f"its clean image {group.clean} ({clean.shape[1]}x{clean.shape[0]})",
                )
            )
            continue
        measured.append(MeasuredSample(sample, measure_pair(reference, degraded, seam_grid)))
        if sample.variant in repeats:
            repeats[sample.variant].append(degraded)
    diversity = {variant: repeat_diversity(images) for variant, images in repeats.items() if len(images) > 1}
    return GroupResult(group, tuple(measured), diversity, tuple(problems))


def retain_freed_memory() -> bool:
    """Make glibc's allocator keep freed image-sized blocks in this process's heap instead of handing them back to
    the kernel: each estimator allocates several megabyte-sized planes, and getting fresh zeroed pages from the
    kernel for every one of them cost about 40% of the measuring time (`scripts/benchmark_evaluate.py`). The heap
    then stays at its high-water mark (tens of MB for 512² images). Process-wide; False (and no change) where the C
    library is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or None).mallopt
    except (AttributeError, OSError, TypeError):
        return False
    return all(mallopt(option, value) == 1 for option, value in _MALLOC_OPTIONS.items())


def _start_worker() -> None:
    """A measuring process: Ctrl-C reaches the whole process group, but only the parent stops the run (it
    terminates the workers), so a worker ignores SIGINT instead of printing a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    retain_freed_memory()


def measure_groups(
    groups: Iterable[PairGroup], workers: int, seam_grid: int = DEFAULT_SEAM_GRID
) -> Iterator[GroupResult]:
    """`measure_group` over `groups`, results in input order; `workers` > 1 uses that many processes. The process
    measuring (this one when `workers` <= 1) keeps freed memory for reuse (`retain_freed_memory`)."""
    if workers <= 1:
        retain_freed_memory()
        yield from map(partial(measure_group, seam_grid=seam_grid), groups)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
    with context.Pool(workers, initializer=_start_worker) as pool:
        yield from pool.imap(partial(measure_group, seam_grid=seam_grid), groups, chunksize=4)
