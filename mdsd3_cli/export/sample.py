"""What every export format's writer is opened with and the interface it has."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mdsd3_cli.dataset.tar_format import EncodedSample


@dataclass(frozen=True)
class ExportTarget:
    """A destination folder (which must not exist) and what the indexed dataset tells a format's writer."""

    destination: Path
    folders: Sequence[str]
    """The run's variant folders, in recipe order."""
    classes: Sequence[str]
    bytes_per_database: Mapping[str | None, tuple[int, int]]
    """(total image bytes, images) for the clean images (None) and each variant folder."""
    run_info: Mapping[str, Any]
    """The dataset's run.json."""
    partial: Mapping[str, Any] | None
    """What a partial export records in its output; None for a complete run."""
    per_file: int | None
    """Keys per tar or rows per file (None: the format's default)."""
    one_lq: bool = False
    """lmdb: one LQ database for every variant folder."""


class SampleWriter(Protocol):
    """Writes samples into one destination; nothing is visible under its final name until `close()`."""

    def write(self, sample: EncodedSample) -> None: ...

    def close(self) -> None:
        """Finish: everything written becomes visible under its final name."""

    def abort(self) -> None:
        """Stop without finishing: remove what was written so far (never a finished file)."""

    def how_to_read(self) -> str:
        """How to load the finished export (a line of Python or a BasicSR setting)."""
