"""Progress for long work: a rich bar on a terminal, a plain line every few seconds otherwise (SLURM logs);
and the console that prints tables in full off a terminal."""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import Any

import rich.console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

UNCUT_WIDTH = 10_000
"""Console width off a terminal: wide enough that no table cell is cut or wrapped."""


class Console(rich.console.Console):
    """rich's Console, except that off a terminal (pipes, SLURM logs, CI) it is UNCUT_WIDTH columns wide instead
    of 80, so tables print in full rather than as "pai…"; an explicit `width` or $COLUMNS still wins."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if kwargs.get("width") is None and "COLUMNS" not in os.environ and not self.is_terminal:
            self.width = UNCUT_WIDTH


class RunProgress:
    """Counts finished items; `rate_label` names the unit (images/s)."""

    def __init__(
        self,
        total: int,
        description: str,
        unit: str = "images",
        console: rich.console.Console | None = None,
        plain_interval_s: float = 5.0,
    ):
        self.total, self.done, self.unit = total, 0, unit
        self.description = description
        self.console = console or Console(stderr=True)
        self.plain_interval_s = plain_interval_s
        self._start = self._last_line = time.perf_counter()
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> RunProgress:
        self._start = self._last_line = time.perf_counter()
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, rate="")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, error, trace)
        elif self.total:
            self._plain_line()

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self._start

    def rate(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(self._task, advance=count, rate=f"{self.rate():.2f} {self.unit}/s")
        elif time.perf_counter() - self._last_line >= self.plain_interval_s:
            self._plain_line()

    def _plain_line(self) -> None:
        self._last_line = time.perf_counter()
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
        print(
            f"{self.description}: {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, "
            f"elapsed {self.elapsed_s:.0f}s, ETA {eta_text}",
            file=sys.stderr,
            flush=True,
        )
