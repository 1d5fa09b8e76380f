"""What format writers consume (an encoded sample) and the interface they share; key naming rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote


@dataclass(frozen=True)
class EncodedSample:
    """One (key, variant folder) pair as file bytes, with its manifest record."""

    record: dict[str, Any]
    clean: bytes
    degraded: bytes
    extension: str
    """Image file extension without the dot (png, jpg, webp)."""
    clean_shape: tuple[int, int, int] | None = None
    degraded_shape: tuple[int, int, int] | None = None
    """(height, width, channels) of each image, from its header (export fills them; BasicSR's meta_info needs them)."""

    @property
    def key(self) -> str:
        return self.record["key"]

    @property
    def folder(self) -> str:
        return self.record["folder"]


class SampleWriter(Protocol):
    """Writes samples into one destination; nothing is visible under its final name until `close()`."""

    def write(self, sample: EncodedSample) -> None: ...

    def close(self) -> None:
        """Finish: everything written becomes visible under its final name."""

    def abort(self) -> None:
        """Stop without finishing: remove what was written so far (never a finished file)."""


def flat_key(name: str) -> str:
    """`name` as an ASCII key without dots or spaces (WebDataset and BasicSR split names at the first dot).

    URL-style escaping keeps letters, digits, `_-~/` and escapes everything else, dots included (`.` -> %2E),
    so different names never share a key: `sub/img.v2 x` -> `sub/img%2Ev2%20x`.
    """
    return quote(name, safe="/").replace(".", "%2E")
