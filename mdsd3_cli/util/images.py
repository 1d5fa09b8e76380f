"""Input discovery (folders, globs, list files → keyed sources) and robust image decoding."""

from __future__ import annotations

import functools
import glob
import itertools
import os
import re
import stat
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal, TypeVar, get_args

import numpy as np
from PIL import Image, ImageFile, ImageOps

ResizePolicy = Literal["center_crop", "resize", "native"]
RESIZE_POLICIES: tuple[str, ...] = get_args(ResizePolicy)
MIN_SIDE = 16
"""Smallest usable image side, and the multiple `native` crops to."""
MAX_KEY_PART_BYTES = 200
"""Longest key path component: leaves room for an output extension and a `.<name>.tmp` temp name."""
DEFAULT_MAX_SIDE = 1536
DEFAULT_MAX_PIXELS = 89_478_485
REDUCING_GAP = 3.0
"""Pillow reduces by an integer factor first, then LANCZOS: deterministic, near-LANCZOS quality, fast."""

_IDENTIFY_ONLY_FORMATS = frozenset({"MPEG"})
_GLOB_MAGIC = re.compile(r"[*?[]")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PILLOW_PIXELS = re.compile(r"\((\d+) pixels\)")
_OPEN_LOCK = threading.Lock()

T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """One input image: its output key and where to read it."""

    key: str
    path: Path


@dataclass(frozen=True)
class InputError:
    """A problem found during discovery.

    `fatal` is True when an entry of `paths` itself is unusable (missing, matches nothing, root name
    clash): the recipe check should stop. It is False when a single file is dropped (duplicate or unsafe
    key, unreadable sub folder): the run goes on and records it in errors/.
    """

    path: str
    reason: str
    fatal: bool
    key: str | None = None


@dataclass
class Discovery:
    """Sources sorted by key, every problem found, and notes (e.g. the output folder left out)."""

    sources: list[Source] = field(default_factory=list)
    errors: list[InputError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    prefixed_keys: bool = False
    """Several distinct input entries: keys start with their root folder's name."""


@dataclass
class _Expanded:
    root: Path | None
    files: list[tuple[str, Path]] = field(default_factory=list)
    errors: list[InputError] = field(default_factory=list)


class ImageError(ValueError):
    """An input image that cannot be used; `reason` is a short human explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class LoadedImage:
    """Decoded RGB pixels ready for the model.

    `crop_box` (left, top, right, bottom) and `original_size` (w, h) are in the EXIF-rotated original.
    """

    pixels: np.ndarray
    crop_box: tuple[int, int, int, int]
    original_size: tuple[int, int]


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with dot) of the formats Pillow can decode (stub and identify-only
    formats such as HDF5, GRIB or MPEG excluded)."""
    return frozenset(
        ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and _decodable(fmt)
    )


def _decodable(fmt: str) -> bool:
    factory = Image.OPEN[fmt][0]
    is_stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
    return not is_stub and fmt not in _IDENTIFY_ONLY_FORMATS


def unsafe_key_reason(key: str) -> str | None:
    """Why `key` cannot be used as a relative output path, or None when it is safe."""
    if not key:
        return "empty key"
    if key.startswith("/"):
        return "absolute key"
    if _CONTROL_CHARS.search(key):
        return "control character in key"
    try:
        encoded_parts = [part.encode("utf-8") for part in key.split("/")]
    except UnicodeEncodeError:
        return "key is not valid UTF-8"
    if any(part in (b"", b".", b"..") for part in encoded_parts):
        return "empty, '.' or '..' component in key"
    if any(len(part) > MAX_KEY_PART_BYTES for part in encoded_parts):
        return f"key component longer than {MAX_KEY_PART_BYTES} bytes"
    return None


def discover_sources(
    paths: Sequence[str | Path],
    recursive: bool = True,
    base_dir: Path | None = None,
    exclude: Sequence[Path] = (),
) -> Discovery:
    """Expand folders, glob patterns and `.txt` list files into uniquely keyed sources (see docs/output.md).

    Entries naming the same thing (e.g. a folder and a link to it) count once. Files inside an `exclude`d
    folder (the output folder) are never inputs.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    entries = _distinct_entries(paths, base)
    prefix_keys = len(entries) > 1
    excluded = [os.path.realpath(folder) for folder in exclude]
    errors: list[InputError] = []
    notes: list[str] = []
    roots_by_name: dict[str, Path] = {}
    paths_by_key: dict[str, set[Path]] = {}
    for entry in entries:
        expanded = _expand_entry(entry, base, recursive)
        kept = [(key, path) for key, path in expanded.files if not _inside_any(path, excluded)]
        if len(kept) < len(expanded.files):
            notes.append(f"the output folder lies inside input {entry}: its files are not inputs")
            expanded.files = kept
        errors.extend(expanded.errors)
        if expanded.root is None:
            continue
        prefix = ""
        if prefix_keys:
            name = expanded.root.name
            owner = roots_by_name.setdefault(name, expanded.root)
            if not name or owner != expanded.root:
                reason = (
                    f"input root {expanded.root} has the same folder name as {owner}; with several inputs, keys "
                    "are prefixed with the root folder name, so these would collide"
                    if name
                    else f"input root {expanded.root} has no folder name to prefix its keys with"
                )
                errors.append(InputError(str(entry), reason, fatal=True))
                continue
            prefix = name + "/"
        for relative_key, path in expanded.files:
            paths_by_key.setdefault(prefix + relative_key, set()).add(path)

    sources: list[Source] = []
    for key in sorted(paths_by_key):
        candidates = sorted(paths_by_key[key])
        problem = unsafe_key_reason(key)
        if problem is not None:
            errors.extend(InputError(str(path), problem, fatal=False, key=key) for path in candidates)
        elif len(candidates) > 1:
            for path in candidates:
                others = ", ".join(str(other) for other in candidates if other != path)
                errors.append(InputError(str(path), f"duplicate key (also {others})", fatal=False, key=key))
        else:
            sources.append(Source(key, candidates[0]))
    return Discovery(sources, errors, notes, prefix_keys)


def _distinct_entries(paths: Sequence[str | Path], base: Path) -> list[str]:
    """`paths` without repeats of the same resolved path (first spelling kept)."""
    seen: set[str] = set()
    distinct = []
    for entry in map(str, paths):
        resolved = os.path.realpath(base / Path(entry).expanduser())
        if resolved not in seen:
            seen.add(resolved)
            distinct.append(entry)
    return distinct


def _inside_any(path: Path, folders: Sequence[str]) -> bool:
    real = os.path.realpath(path)
    return any(real == folder or real.startswith(folder.rstrip(os.sep) + os.sep) for folder in folders)


def _expand_entry(entry: str, base: Path, recursive: bool) -> _Expanded:
    """Resolve one entry of `paths` to its root folder and (key without prefix, path) pairs."""
    path = Path(os.path.normpath(base / Path(entry).expanduser()))
    if path.is_dir():
        expanded = _Expanded(path)
        for file in _walk_folder(path, recursive, expanded.errors):
            expanded.files.append((_relative_key(file, path), file))
    elif path.is_file() and path.suffix.lower() == ".txt":
        expanded = _expand_list_file(path)
    elif path.is_file():
        expanded = _Expanded(path.parent, [(path.stem, path)])
    elif path.exists():
        return _Expanded(None, errors=[InputError(entry, f"not a regular file or folder: {path}", fatal=True)])
    elif _GLOB_MAGIC.search(entry):
        expanded = _expand_glob(path)
    else:
        return _Expanded(None, errors=[InputError(entry, f"input path does not exist: {path}", fatal=True)])
    if not expanded.files and not any(error.fatal for error in expanded.errors):
        expanded.errors.append(InputError(entry, f"no image files found in {path}", fatal=True))
    return expanded


def walk_images(
    root: Path, recursive: bool = True, on_error: Callable[[OSError], None] | None = None
) -> Iterator[Path]:
    """Image files below `root` (the formats Pillow decodes, `image_extensions`), in sorted order, hidden entries
    skipped, symlinked folders followed once each; the one folder walk of generate, train and evaluate.
    `on_error` receives a folder that cannot be listed (default: skipped)."""
    extensions = image_extensions()
    visited: set[str] = set()
    for folder, subfolders, names in os.walk(root, onerror=on_error, followlinks=True):
        real_folder = os.path.realpath(folder)
        if real_folder in visited:
            subfolders.clear()
            continue
        visited.add(real_folder)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith(".")) if recursive else []
        for name in sorted(names):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                yield Path(folder, name)


def _walk_folder(root: Path, recursive: bool, errors: list[InputError]) -> Iterator[Path]:
    def report(exc: OSError) -> None:
        errors.append(InputError(str(exc.filename), f"cannot list folder: {exc.strerror or exc}", fatal=False))

    return walk_images(root, recursive, report)


def _expand_glob(pattern: Path) -> _Expanded:
    """Files matching `pattern` (`**` allowed); the root is the folder before the first wildcard component."""
    parts = pattern.parts
    first_magic = next(index for index, part in enumerate(parts) if _GLOB_MAGIC.search(part))
    root = Path(*parts[:first_magic])
    extensions = image_extensions()
    expanded = _Expanded(root)
    for match in glob.glob(str(pattern), recursive=True):
        file = Path(match)
        relative = file.relative_to(root)
        if (
            file.suffix.lower() in extensions
            and not any(part.startswith(".") for part in relative.parts)
            and file.is_file()
        ):
            expanded.files.append((_relative_key(file, root), file))
    if not expanded.files:
        expanded.errors.append(InputError(str(pattern), "pattern matches no image files", fatal=True))
    return expanded


def _expand_list_file(list_file: Path) -> _Expanded:
    """Paths listed one per line; keys relative to the list's folder, or the file stem when outside it.

    Listed files are taken as given (no existence check: a missing one fails at decoding and is recorded).
    """
    root = list_file.parent
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        return _Expanded(None, errors=[InputError(str(list_file), f"cannot read list file: {exc}", fatal=True)])
    expanded = _Expanded(root)
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        file = Path(os.path.normpath(root / Path(entry).expanduser()))
        key = _relative_key(file, root) if file.is_relative_to(root) else file.stem
        expanded.files.append((key, file))
    return expanded


def _relative_key(file: Path, root: Path) -> str:
    """`file` relative to `root`, without extension, with '/' separators."""
    return file.relative_to(root).with_suffix("").as_posix()


def load_image(
    path: str | Path,
    size: int,
    resize: ResizePolicy,
    max_side: int = DEFAULT_MAX_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedImage:
    """Decode `path` to contiguous uint8 RGB pixels sized by the `resize` policy; ImageError if unusable.

    `size` is the output side for `center_crop`/`resize`; `native` keeps the resolution (cropped to multiples
    of 16) and rejects images with a side above `max_side`. Pillow's own bomb limit (2 x
    `Image.MAX_IMAGE_PIXELS`) still applies above `max_pixels`.
    """
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {resize!r}; expected one of {RESIZE_POLICIES}")
    if size < MIN_SIDE:
        raise ValueError(f"size {size} is below the minimum {MIN_SIDE}")
    image = _decode(Path(path), max_pixels, max_side if resize == "native" else None)
    return _fit(to_rgb(image), size, resize)


def fit_image(image: Image.Image, size: int, resize: ResizePolicy, max_side: int = DEFAULT_MAX_SIDE) -> LoadedImage:
    """An image already in memory shaped as `load_image` shapes a file: EXIF orientation applied, converted to
    RGB, fitted by the `resize` policy; ImageError when it is too small (or, for `native`, above `max_side`)."""
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"unknown resize policy {resize!r}; expected one of {RESIZE_POLICIES}")
    _check_header_size(*image.size, image.width * image.height, max_side if resize == "native" else None)
    return _fit(to_rgb(ImageOps.exif_transpose(image)), size, resize)


def _decode(path: Path, max_pixels: int, max_side: int | None) -> Image.Image:
    """Open, check the header size, fully decode and apply EXIF orientation; any failure is an ImageError."""
    try:
        file_stat = path.stat()
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(file_stat.st_mode):
        raise ImageError("not a regular file")
    if file_stat.st_size == 0:
        raise ImageError("empty file")
    try:
        file = open(path, "rb")  # our handle: the decoded image outlives it
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    with file:
        return decode_image(file, max_pixels, max_side)


def decode_image(
    file: BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None, min_side: int = MIN_SIDE
) -> Image.Image:
    """Check the header size (`min_side`, `max_pixels`, `max_side`), fully decode and apply EXIF orientation;
    any failure is an ImageError with the reason."""
    try:
        image = _open_without_bomb_warning(file)
        _check_header_size(*image.size, max_pixels, max_side, min_side)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return image
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (no Pillow decoder recognises it)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(_pillow_bomb_reason(exc, max_pixels)) from None
    except MemoryError:
        raise ImageError("out of memory while decoding") from None
    except Exception as exc:  # any decoder failure is bad input, never a crash
        raise ImageError(f"truncated or corrupt image: {type(exc).__name__}: {exc}") from None


def decode_rgb(file: BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1) -> Image.Image:
    """The one decoding path of everything that reads images back (evaluate, preview, train, verify): decoded as
    `decode_image`, then `to_rgb`. ImageError with the reason when unusable."""
    if not file.read(1):
        raise ImageError("empty file")
    file.seek(0)
    return to_rgb(decode_image(file, max_pixels, None, min_side))


def _open_without_bomb_warning(file: BinaryIO) -> Image.Image:
    """Image.open (header only) with Pillow's bomb warning silenced: our own size check decides instead.

    warnings.catch_warnings mutates process-wide state, so decoder threads take turns here (headers only).
    """
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(file)


def _check_header_size(
    width: int, height: int, max_pixels: int, max_side: int | None, min_side: int = MIN_SIDE
) -> None:
    """Reject images too small, too many pixels, or (native policy) too large, before decoding."""
    if width < min_side or height < min_side:
        raise ImageError(f"too small: {width}x{height}, need at least {min_side}x{min_side}")
    if width * height > max_pixels:
        raise ImageError(
            f"decompression bomb guard: {width}x{height} = {width * height / 1e6:.0f} MP exceeds max_pixels "
            f"({max_pixels / 1e6:.0f} MP)"
        )
    if max_side is not None and max(width, height) > max_side:
        raise ImageError(f"larger than max_side {max_side} (native): {width}x{height}")


def _pillow_bomb_reason(exc: Exception, max_pixels: int) -> str:
    """A reason for an image Pillow refused before its size reached our own check."""
    match = _PILLOW_PIXELS.search(str(exc))
    if match is None:
        return f"decompression bomb guard: {exc}"
    pixels = int(match.group(1))
    if pixels > max_pixels:
        return f"decompression bomb guard: {pixels / 1e6:.0f} MP exceeds max_pixels ({max_pixels / 1e6:.0f} MP)"
    return f"decompression bomb guard: {pixels / 1e6:.0f} MP exceeds Pillow's limit (Image.MAX_IMAGE_PIXELS)"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB: alpha over white, 16-bit/int/float scaled (not clipped) to 8 bit. ImageError for a
    float image with a NaN or infinite pixel (no 8-bit value stands for it)."""
    mode = image.mode
    if mode == "F" and not np.isfinite(np.asarray(image)).all():
        raise ImageError("float image with NaN or infinite pixel values")
    try:
        if mode in ("I", "F") or mode.startswith("I;16"):
            return Image.fromarray(_scale_to_uint8(np.asarray(image), mode)).convert("RGB")
        if image.has_transparency_data:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image if mode == "RGB" else image.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"unsupported image mode {mode}: {exc}") from None


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit → /257; I: /257 when its max exceeds 255; F: x255 when within [0, 1], else as I."""
    scaled = values.astype(np.float32)
    top = float(scaled.max()) if scaled.size else 0.0
    if mode.startswith("I;16") or top > 255:
        scaled /= 257
    elif mode == "F" and top <= 1.0:
        scaled *= 255
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _fit(image: Image.Image, size: int, policy: str) -> LoadedImage:
    """Apply the resize policy; record the source box the output pixels come from."""
    width, height = image.size
    if policy == "native":
        crop_width, crop_height = width - width % MIN_SIDE, height - height % MIN_SIDE
        left, top = (width - crop_width) // 2, (height - crop_height) // 2
        box = (left, top, left + crop_width, top + crop_height)
        fitted = image if box == (0, 0, width, height) else image.crop(box)
    elif policy == "resize":
        box = (0, 0, width, height)
        fitted = image.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
    else:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
        fitted = image.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)
    return LoadedImage(np.array(fitted, dtype=np.uint8, order="C"), box, (width, height))


def iter_loaded(
    items: Iterable[T], load: Callable[[T], LoadedImage], workers: int = 4, prefetch: int = 16
) -> Iterator[tuple[T, LoadedImage | ImageError]]:
    """Decode `items` with `load` on `workers` threads, yielding (item, image or ImageError) in input order.

    At most `prefetch` items are decoded ahead of the one being consumed. Closing the generator cancels
    queued work and waits only for decodes already running. Exceptions other than ImageError propagate.
    Use e.g. `load=lambda source: load_image(source.path, 512, "center_crop")`.
    """
    if workers < 1 or prefetch < 1:
        raise ValueError(f"workers ({workers}) and prefetch ({prefetch}) must be at least 1")
    remaining = iter(items)
    pending: deque[tuple[T, Future[LoadedImage]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mdsd3-decode") as pool:

        def top_up() -> None:
            for item in itertools.islice(remaining, prefetch - len(pending)):
                pending.append((item, pool.submit(load, item)))

        try:
            top_up()
            while pending:
                item, future = pending.popleft()
                try:
                    result: LoadedImage | ImageError = future.result()
                except ImageError as exc:
                    result = exc
                top_up()
                yield item, result
        finally:
            for _, future in pending:
                future.cancel()
