"""Output layout, deterministic encoding, atomic writes, the manifest and resume (docs/output.md)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Container, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from PIL import Image

from mdsd3_cli.dataset.manifest import RUN_JSON, ManifestLineError, parse_record
from mdsd3_cli.util.atomic import atomic_write, open_append
from mdsd3_cli.util.background_writer import BackgroundWriter
from mdsd3_cli.util.images import unsafe_key_reason
from mdsd3_cli.util.safe_names import safe_component

ImageFormat = Literal["png", "jpeg", "webp"]
FORMAT_EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
JPEG_444_MIN_QUALITY = 90
"""From this JPEG quality on, chroma is kept at full resolution (4:4:4); below it, 4:2:0."""
WEBP_METHOD = 4
RUN_TOOL, RUN_SCHEMA = "mdsd3", 1
"""run.json's `tool` and `schema` fields: the marker saying mdsd3 wrote it (see ownership.run_json_problem)."""
SHARD_PATTERN = r"shard-\d{5}-of-\d{5}"
"""A shard's name (`ShardSpec.name`): the stem of its manifest, error log and tars."""
_TAIL_CHUNK = 1 << 16


class OutputPathError(ValueError):
    """An output path would leave the output folder (or is not a safe relative path)."""


class OutputConflictError(RuntimeError):
    """The output folder holds a different run."""


class OutputLayout:
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
        return self._inside("clean", _checked_key(key), self.extension)

    def degraded_path(self, folder: str, key: str) -> Path:
        return self._inside(f"degraded/{_checked_name(folder, 'folder')}", _checked_key(key), self.extension)

    def manifest_path(self, shard: str) -> Path:
        return self._inside("manifest", _checked_name(shard, "shard"), "jsonl")

    def errors_path(self, shard: str) -> Path:
        return self._inside("errors", _checked_name(shard, "shard"), "jsonl")

    def relative(self, path: Path) -> str:
        """`path` relative to the output folder, with '/' separators (as stored in the manifest)."""
        return path.relative_to(self.root).as_posix()

    def _inside(self, area: str, name: str, extension: str) -> Path:
        path = self.root / area / f"{name}.{extension}"
        if not path.parent.resolve().is_relative_to(self.root):  # a link at the final name itself is replaced
            raise OutputPathError(f"{area}/{name}.{extension} resolves outside the output folder {self.root}")
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


def encode_image(pixels: np.ndarray, fmt: ImageFormat, quality: int = 95, png_compress_level: int = 1) -> bytes:
    """Encode HxWx3 uint8 pixels; the same pixels and settings always give the same bytes (no metadata)."""
    _check_pixels(pixels, "pixels")
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, "PNG", compress_level=png_compress_level, optimize=False)
    elif fmt == "jpeg":
        subsampling = 0 if quality >= JPEG_444_MIN_QUALITY else 2
        image.save(buffer, "JPEG", quality=quality, subsampling=subsampling, optimize=False, progressive=False)
    elif fmt == "webp":
        image.save(buffer, "WEBP", quality=quality, method=WEBP_METHOD, lossless=False, exact=False)
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {list(FORMAT_EXTENSIONS)}")
    return buffer.getvalue()


def _check_pixels(pixels: np.ndarray, name: str) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        description = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise ValueError(f"{name} must be an HxWx3 uint8 array, got {description}")


FileDigest = tuple[str, int]
"""A file's SHA-256 (hex) and size in bytes, as the manifest records them."""


def digest(data: bytes) -> FileDigest:
    """SHA-256 (hex) and size of `data`."""
    return hashlib.sha256(data).hexdigest(), len(data)


def file_digest_fields(role: str, sha256: str, size: int) -> dict[str, Any]:
    """Manifest fields of one written file: `<role>_sha256` and `<role>_bytes` (role: clean or degraded)."""
    return {f"{role}_sha256": sha256, f"{role}_bytes": size}


def _resolved(value: FileDigest) -> Future[FileDigest]:
    future: Future[FileDigest] = Future()
    future.set_result(value)
    return future


def _json_line(record: Mapping[str, Any]) -> bytes:
    """One manifest/errors line: sorted keys, ASCII-only (any file name encodes), newline-terminated."""
    return (json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode("ascii")


def _truncate_partial_line(file: BinaryIO) -> None:
    """Cut a line left unfinished by a killed append (everything after the last newline)."""
    end = file.seek(0, os.SEEK_END)
    keep, position = 0, end
    while position > 0:
        start = max(0, position - _TAIL_CHUNK)
        file.seek(start)
        newline = file.read(position - start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        position = start
    if keep != end:
        file.truncate(keep)
        file.flush()
        os.fsync(file.fileno())


class DatasetWriter(BackgroundWriter):
    """Writes samples of one shard: images encoded on worker threads, atomically renamed, manifest line last.

    Use as a context manager. `submit` returns at once unless too many samples are in flight
    (backpressure). The first failure of a worker is raised by the next `submit`, `drain` or `close`.
    A key's clean image is written once per writer, by its first sample, even when an earlier run wrote
    it already (same pixels, same bytes): that rewrite is what replaces a temp file a killed run left.
    """

    def __init__(
        self,
        out_dir: str | Path,
        shard: str,
        fmt: ImageFormat = "png",
        quality: int = 95,
        png_compress_level: int = 1,
        workers: int = 2,
    ) -> None:
        super().__init__(workers, "mdsd3-writer")
        self.layout = OutputLayout(out_dir, fmt)
        self.shard = shard
        self.fmt: ImageFormat = fmt
        self.quality = quality
        self.png_compress_level = png_compress_level
        self.written = 0
        self.errors = 0
        self.bytes_written = 0
        root = self.layout.root
        self._manifest = open_append(self.layout.manifest_path(shard), root)  # open for the writer's lifetime
        _truncate_partial_line(self._manifest)
        self._errors = open_append(self.layout.errors_path(shard), root, truncate=True)  # the latest run's errors
        self._in_flight: set[tuple[str, str]] = set()
        self._clean_written: dict[str, FileDigest] = {}
        self._clean_writing: dict[str, Future[FileDigest]] = {}

    def submit(self, record: Mapping[str, Any], clean: np.ndarray, degraded: np.ndarray) -> None:
        """Queue one sample; `record` needs `key` and `folder` and gains the `clean`/`degraded` paths."""
        self._check_open()
        key, folder = record["key"], record["folder"]
        clean_path, degraded_path = self.layout.clean_path(key), self.layout.degraded_path(folder, key)
        _check_pixels(clean, "clean")
        _check_pixels(degraded, "degraded")
        located = {**record, "clean": self.layout.relative(clean_path), "degraded": self.layout.relative(degraded_path)}
        _json_line(located)  # a record that cannot be written fails here, in the caller
        with self._lock:
            if (key, folder) in self._in_flight:
                raise ValueError(f"sample key={key!r} folder={folder!r} is already being written")
            self._in_flight.add((key, folder))
        self._slots.acquire()  # backpressure: blocks while too many samples are in flight
        with self._lock:
            clean_owner: Future[FileDigest] | None = None
            clean_wait = self._clean_writing.get(key)
            if key in self._clean_written:
                clean_wait = _resolved(self._clean_written[key])
            elif clean_wait is None:
                clean_owner = self._clean_writing[key] = Future()
        self._start(
            self._write_sample,
            key,
            folder,
            located,
            (clean_path, clean.copy(), clean_owner) if clean_owner is not None else None,
            clean_wait,
            (degraded_path, degraded.copy()),
        )

    def record_error(self, key: str | None, path: str | Path, reason: str) -> None:
        """Append one line to this shard's errors file for a skipped input."""
        line = _json_line({"key": key, "path": str(path), "reason": reason})
        with self._lock:
            self._errors.write(line)
            self._errors.flush()
            self.errors += 1

    def append_manifest_lines(self, lines: list[bytes]) -> None:
        """Append whole records another layout's writer finished (generate.webdataset_layout), fsynced."""
        with self._lock:
            self._manifest.writelines(lines)
            self._manifest.flush()
            os.fsync(self._manifest.fileno())

    def _release(self) -> None:
        self._manifest.close()
        self._errors.close()

    def _write_sample(
        self,
        key: str,
        folder: str,
        record: dict[str, Any],
        clean_job: tuple[Path, np.ndarray, Future[FileDigest]] | None,
        clean_wait: Future[FileDigest] | None,
        degraded_job: tuple[Path, np.ndarray],
    ) -> None:
        """Worker: write the clean image (if this sample owns it), the degraded one, then the manifest line
        with both files' SHA-256 and size."""
        try:
            clean_digest = self._write_clean(key, *clean_job) if clean_job is not None else None
            degraded_path, degraded = degraded_job
            degraded_bytes = encode_image(degraded, self.fmt, self.quality, self.png_compress_level)
            self._write_file(degraded_path, degraded_bytes)
            if clean_wait is not None:
                clean_digest = clean_wait.result()  # the clean image of this key is written by an earlier sample
            line = _json_line(
                {
                    **record,
                    **file_digest_fields("clean", *clean_digest),
                    **file_digest_fields("degraded", *digest(degraded_bytes)),
                }
            )
            with self._lock:
                self._manifest.write(line)
                self._manifest.flush()
                os.fsync(self._manifest.fileno())
                self.written += 1
        except BaseException as exc:
            exc.add_note(f"while writing sample key={key!r} folder={folder!r}")
            raise
        finally:
            with self._lock:
                self._in_flight.discard((key, folder))
            self._slots.release()

    def _write_clean(self, key: str, path: Path, pixels: np.ndarray, done: Future[FileDigest]) -> FileDigest:
        try:
            data = encode_image(pixels, self.fmt, self.quality, self.png_compress_level)
            self._write_file(path, data)
            result = digest(data)
        except BaseException as exc:
            done.set_exception(exc)
            with self._lock:
                del self._clean_writing[key]
            raise
        with self._lock:
            self._clean_written[key] = result
            del self._clean_writing[key]
        done.set_result(result)
        return result

    def _write_file(self, path: Path, data: bytes) -> None:
        """Write atomically (see `atomic.atomic_write`): `path` is never partial."""
        atomic_write(path, data, root=self.layout.root)
        with self._lock:
            self.bytes_written += len(data)


def completed_samples(out_dir: str | Path, keys: Container[str] | None = None) -> set[tuple[str, str]]:
    """(key, folder) pairs finished by any shard: a manifest line whose clean and degraded files exist.

    Reads every manifest/*.jsonl (so a different shard count still sees earlier work), ignoring corrupt or
    unfinished lines; writes nothing. `keys` limits the result (and the file checks) to those keys.
    """
    root = Path(out_dir)
    finished: set[tuple[str, str]] = set()
    clean_exists: dict[str, bool] = {}
    for manifest in sorted(root.glob("manifest/*.jsonl")):
        with open(manifest, "rb") as file:
            for line in file:
                try:
                    record = parse_record(line)
                except ManifestLineError:
                    continue
                if "clean" not in record:
                    continue  # a webdataset record: its tar, not files, holds the images
                key, folder, clean, degraded = record["key"], record["folder"], record["clean"], record["degraded"]
                if (keys is not None and key not in keys) or (key, folder) in finished:
                    continue
                if clean not in clean_exists:
                    clean_exists[clean] = (root / clean).is_file()
                if clean_exists[clean] and (root / degraded).is_file():
                    finished.add((key, folder))
    return finished


def write_run_json(out_dir: str | Path, payload: Mapping[str, Any]) -> Path:
    """Atomically write OUT/run.json; `payload["identity"]` is what `check_run_compatible` compares.

    Every shard of an array job may write run.json at the same time: each uses its own temp file.
    """
    if "identity" not in payload:
        raise ValueError("run.json payload needs an 'identity' entry")
    path = Path(out_dir) / RUN_JSON
    marked = {**payload, "tool": RUN_TOOL, "schema": RUN_SCHEMA}
    atomic_write(
        path, (json.dumps(marked, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"), shared=True
    )
    return path


def check_run_compatible(out_dir: str | Path, identity: Mapping[str, Any], overwrite: bool) -> None:
    """Raise OutputConflictError when OUT/run.json holds another identity (unless `overwrite`)."""
    path = Path(out_dir) / RUN_JSON
    if overwrite or not path.exists():
        return
    advice = "pass --overwrite to replace it, or choose another output folder"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))["identity"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputConflictError(
            f"output folder {Path(out_dir)} has an unreadable run.json ({exc}); {advice}"
        ) from None
    expected = json.loads(json.dumps(identity))  # tuples → lists, as stored
    if stored == expected:
        return
    shown = identity_differences(stored, expected)
    more = f" and {len(shown) - MAX_SHOWN_DIFFERENCES} more" if len(shown) > MAX_SHOWN_DIFFERENCES else ""
    raise OutputConflictError(
        f"output folder {Path(out_dir)} already holds a different run ({'; '.join(shown[:MAX_SHOWN_DIFFERENCES])}"
        f"{more}; its run.json → this recipe); use the recipe it was made with to resume, {advice}"
    )


MAX_SHOWN_DIFFERENCES = 5


def identity_differences(stored: Any, expected: Any, path: str = "") -> list[str]:
    """`path: stored → expected` for each leaf where two run identities differ, down to the field that differs
    (`variants[1].name`); a list of another length also gets `path: N items → M items`."""
    if isinstance(stored, dict) and isinstance(expected, dict):
        found = []
        for name in sorted(stored.keys() | expected.keys()):
            found += identity_differences(stored.get(name), expected.get(name), f"{path}.{name}" if path else name)
        return found
    if isinstance(stored, list) and isinstance(expected, list):
        found = (
            []
            if len(stored) == len(expected)
            else [f"{path or 'identity'}: {_items(len(stored))} → {_items(len(expected))}"]
        )
        for index, (old, new) in enumerate(zip(stored, expected)):
            found += identity_differences(old, new, f"{path}[{index}]")
        return found
    if stored == expected:
        return []
    return [f"{path or 'identity'}: {_shown_pair(stored, expected)}"]


def _items(count: int) -> str:
    return f"{count} item" if count == 1 else f"{count} items"


def _shown_pair(stored: Any, expected: Any, limit: int = 60) -> str:
    """`stored → expected` as JSON; texts longer than `limit` are cut to a window around their first difference,
    the same on both sides, so the difference shows."""
    texts = ["(none)" if value is None else json.dumps(value, sort_keys=True) for value in (stored, expected)]
    if max(len(text) for text in texts) <= limit:
        return " → ".join(texts)
    first = next((i for i, (a, b) in enumerate(zip(*texts)) if a != b), min(len(text) for text in texts))
    start = max(0, first - limit // 3)
    return " → ".join(
        ("…" if start else "") + text[start : start + limit] + ("…" if start + limit < len(text) else "")
        for text in texts
    )


LISTED_FILE_FIELDS = ("clean", "degraded", "tar")
"""Manifest fields naming files in OUT (images of the folders layout, the tar of the webdataset layout)."""


_RECORDED_TAR = re.compile(rf"{SHARD_PATTERN}-\d{{6}}\.tar")


def _recorded_shape(relative: str) -> bool:
    """Whether `relative` has the shape of a file mdsd3 writes: clean/<key>.<ext>, degraded/<folder>/<key>.<ext>
    or tars/<shard>-<n>.tar."""
    parts = relative.split("/")
    if parts[0] == "tars":
        return len(parts) == 2 and _RECORDED_TAR.fullmatch(parts[1]) is not None
    if parts[-1].rpartition(".")[2] not in FORMAT_EXTENSIONS.values():
        return False
    if parts[0] == "degraded" and len(parts) >= 3:
        try:
            safe_component(parts[1], "variant folder")
        except ValueError:
            return False
        return True
    return parts[0] == "clean" and len(parts) >= 2


def manifest_listed_files(out_dir: str | Path) -> list[Path]:
    """The files the manifest lines name (what mdsd3 recorded writing), and those a shard's plan file
    (`manifest/<shard>.tars.json`) lists under "files" (its planned tars), each checked to be a safe relative path
    of a shape mdsd3 writes whose folder lies inside the output folder; sorted, without duplicates."""
    root = Path(out_dir).resolve()
    listed: set[Path] = set()

    def add(names: list[Any]) -> None:
        for relative in (name for name in names if isinstance(name, str)):
            path = root / relative
            if (
                unsafe_key_reason(relative) is None
                and _recorded_shape(relative)
                and path.parent.resolve().is_relative_to(root)
            ):
                listed.add(path)

    for manifest in own_logs(root, "manifest", ".jsonl"):
        with open(manifest, "rb") as file:
            for line in file:
                try:
                    record = parse_record(line)
                except ManifestLineError:
                    continue  # a line mdsd3 cannot read as its own record names nothing to delete
                add([record.get(name) for name in LISTED_FILE_FIELDS])
    for listing in own_logs(root, "manifest", ".tars.json"):
        try:
            files = json.loads(listing.read_text(encoding="utf-8")).get("files")
        except (OSError, ValueError, AttributeError):
            continue
        add(files if isinstance(files, list) else [])
    return sorted(listed)


def own_logs(root: Path, area: str, suffix: str) -> list[Path]:
    """The files named `<shard><suffix>` in OUT/<area> (a shard's manifest, plan or error log), in name order:
    the only names there that mdsd3 writes."""
    name = re.compile(rf"{SHARD_PATTERN}{re.escape(suffix)}")
    return sorted(path for path in (Path(root) / area).glob(f"*{suffix}") if name.fullmatch(path.name))
