"""Where every file of a folders-layout output lives, each path checked to stay inside the output folder."""

from __future__ import annotations

from pathlib import Path

from mdsd3_cli.dataset.encoding import FORMAT_EXTENSIONS, ImageFormat
from mdsd3_cli.dataset.names import (
    CLEAN_FOLDER,
    DEGRADED_FOLDER,
    ERRORS_FOLDER,
    ERRORS_SUFFIX,
    MANIFEST_FOLDER,
    MANIFEST_SUFFIX,
    RUN_JSON,
)
from mdsd3_cli.util.images import unsafe_key_reason


class OutputPathError(ValueError):
    """An output path would leave the output folder (or is not a safe relative path)."""


class OutputPaths:
    """Where every output file of a run lives; every path is checked to stay inside `root`."""

    def __init__(self, out_dir: str | Path, image_format: ImageFormat = "png") -> None:
        if image_format not in FORMAT_EXTENSIONS:
            raise ValueError(f"unknown image format {image_format!r}; expected one of {list(FORMAT_EXTENSIONS)}")
        self.root = Path(out_dir).expanduser().resolve()
        self.extension = FORMAT_EXTENSIONS[image_format]

    @property
    def run_json(self) -> Path:
        return self.root / RUN_JSON

    def clean_path(self, key: str) -> Path:
        return self._inside(CLEAN_FOLDER, f"{_checked_key(key)}.{self.extension}")

    def degraded_path(self, folder: str, key: str) -> Path:
        folder = _checked_name(folder, "folder")
        return self._inside(f"{DEGRADED_FOLDER}/{folder}", f"{_checked_key(key)}.{self.extension}")

    def manifest_path(self, shard: str) -> Path:
        return self._inside(MANIFEST_FOLDER, _checked_name(shard, "shard") + MANIFEST_SUFFIX)

    def errors_path(self, shard: str) -> Path:
        return self._inside(ERRORS_FOLDER, _checked_name(shard, "shard") + ERRORS_SUFFIX)

    def relative(self, path: Path) -> str:
        """`path` relative to the output folder, with '/' separators (as stored in the manifest)."""
        return path.relative_to(self.root).as_posix()

    def _inside(self, area: str, file_name: str) -> Path:
        path = self.root / area / file_name
        if not path.parent.resolve().is_relative_to(self.root):  # a link at the final name itself is replaced
            raise OutputPathError(f"{area}/{file_name} resolves outside the output folder {self.root}")
        return path


def _checked_key(key: str) -> str:
    problem = unsafe_key_reason(key)
    if problem is not None:
        raise OutputPathError(f"unsafe key {key!r}: {problem}")
    return key


def _checked_name(name: str, what: str) -> str:
    problem = unsafe_key_reason(name) or ("contains '/'" if "/" in name else None)
    if problem is not None:
        raise OutputPathError(f"unsafe {what} name {name!r}: {problem}")
    return name
