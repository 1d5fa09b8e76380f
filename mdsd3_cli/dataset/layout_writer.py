"""The interface every output layout's writer has (`generate` writes through it, whatever the layout)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mdsd3_cli.dataset.shard_log import ErrorLine
from mdsd3_cli.recipe.generate import OutputSection
from mdsd3_cli.util.background_writer import BackgroundWriter

Sample = tuple[str, str]
"""A sample of the plan: (key, variant folder)."""


class PlannedSample(Protocol):
    """One sample of a shard's plan, in plan order (a key's samples together)."""

    @property
    def key(self) -> str: ...

    @property
    def folder(self) -> str: ...


Plan = Callable[[], Sequence[PlannedSample]]
"""Builds the shard's plan: only a layout that needs it calls it."""


class LayoutWriter(BackgroundWriter, ABC):
    """Writes one shard of a run in one output layout: images encoded on worker threads, each finished sample's
    manifest line appended, skipped inputs logged. Use as a context manager; `submit` blocks while too many
    samples are in flight; a worker's first failure is raised by the next `submit`, `drain` or `close`."""

    written: int
    """Samples whose manifest line is written."""
    errors: int
    """Inputs logged as skipped."""
    bytes_written: int

    @classmethod
    @abstractmethod
    def open(cls, out_dir: Path, shard: str, output: OutputSection, plan: Plan) -> LayoutWriter:
        """The writer of shard `shard` (a `names.shard_name`) with the recipe's `output` settings."""

    @classmethod
    @abstractmethod
    def completed(
        cls, out_dir: Path, shard: str, output: OutputSection, plan: Plan
    ) -> tuple[set[Sample], dict[str, ErrorLine]]:
        """The samples earlier runs finished in this layout, and the failed inputs not to retry; writes nothing."""

    @abstractmethod
    def submit(self, record: Mapping[str, Any], clean: np.ndarray, degraded: np.ndarray) -> None:
        """Queue one sample; `record` needs `key` and `folder`."""

    @abstractmethod
    def record_error(self, key: str | None, path: str | Path, reason: str) -> None:
        """Log an input that is skipped."""
