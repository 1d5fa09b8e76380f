"""mdsd3: paired clean/degraded image datasets from a masked Stable Diffusion 3 transformer.

Python API (docs/python_api.md): `Synthesizer` degrades images in memory as `mdsd3 generate` does, and
`DegradedPairs` is a torch Dataset of pairs made on the fly. Both load torch, so they are imported on first use
(the command line stays quick to start, and `mdsd3 evaluate` never loads torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mdsd3_cli.util.version import __version__

__all__ = ["DegradedPairs", "Pair", "Synthesizer", "__version__"]

if TYPE_CHECKING:
    from mdsd3_cli.pipeline.synthesizer import Pair, Synthesizer
    from mdsd3_cli.train.onthefly import DegradedPairs

_LAZY = {"Synthesizer": "pipeline.synthesizer", "Pair": "pipeline.synthesizer", "DegradedPairs": "train.onthefly"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_LAZY[name]}", __name__), name)
