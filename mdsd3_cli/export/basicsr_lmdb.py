"""BasicSR's paired LMDB layout: `gt.lmdb` (clean) and `lq_<folder>.lmdb` (one per variant folder), each
holding image bytes under ASCII keys without dots and a `meta_info.txt` of `<key>.<ext> (h,w,c) <level>` lines,
with the same key set in every database (what BasicSR's `paired_paths_from_lmdb` requires).

With `one_lq`, one `lq.lmdb` holds every variant under the pair key `<key>/<folder>` and `gt.lmdb` holds the
clean image under the same pair keys (once per pair: BasicSR pairs databases by equal keys), so one
PairedImageDataset reads every pair."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb

from mdsd3_cli.dataset.tar_format import EncodedSample, flat_key
from mdsd3_cli.export.sample import ExportTarget
from mdsd3_cli.export.staging import StagedFolder
from mdsd3_cli.util.atomic import naming, space_error
from mdsd3_cli.util.safe_names import safe_component

GT_NAME = "gt.lmdb"
ONE_LQ_NAME = "lq.lmdb"
META_INFO = "meta_info.txt"
COMMIT_EVERY = 256
COMMIT_BYTES = 64 * 2**20
"""A transaction is committed after COMMIT_EVERY puts or COMMIT_BYTES of values (its dirty pages stay in memory)."""
MAX_KEY_BYTES = 511
"""LMDB's default longest key."""
PAGE_OVERHEAD = 2 * 4096
"""Bytes reserved per value beyond its size (LMDB stores large values on whole overflow pages)."""


def lq_name(folder: str) -> str:
    """The database of one variant folder; ValueError when `folder` is not a single safe path component."""
    return f"lq_{safe_component(folder, 'variant folder')}.lmdb"


class _Database:
    """One LMDB database folder with its meta_info.txt, filled in bounded transactions. Every failure is an
    OSError naming the database (a full disk says so), never an lmdb traceback."""

    def __init__(self, path: Path, payload_bytes: int, entries: int) -> None:
        self.path = path
        self.environment = self.transaction = self.meta_info = None
        try:
            with self._named("open"):
                path.mkdir()
                self.environment = lmdb.open(str(path), map_size=2 * payload_bytes + entries * PAGE_OVERHEAD + 2**26)
                self.meta_info = open(path / META_INFO, "w", encoding="ascii")
                self.transaction = self.environment.begin(write=True)
        except BaseException:
            self.abort()
            raise
        self.uncommitted = self.uncommitted_bytes = 0

    @contextmanager
    def _named(self, what: str):
        try:
            yield
        except lmdb.DiskError:  # ENOSPC
            raise space_error(self.path) from None
        except lmdb.Error as error:  # e.g. MapFullError
            raise OSError(f"{self.path}: {what}: {error}") from None
        except OSError as error:  # the folder or meta_info.txt
            raise naming(error, self.path / META_INFO if error.filename is None else error.filename) from None

    def put(self, key: str, data: bytes, meta_line: str) -> None:
        with self._named(f"key {key!r}"):
            if not self.transaction.put(key.encode("ascii"), data, overwrite=False):
                raise ValueError(f"key {key!r} is written twice")
            self.meta_info.write(meta_line)
            self.uncommitted += 1
            self.uncommitted_bytes += len(data)
            if self.uncommitted == COMMIT_EVERY or self.uncommitted_bytes >= COMMIT_BYTES:
                self.transaction.commit()
                self.transaction = self.environment.begin(write=True)
                self.uncommitted = self.uncommitted_bytes = 0

    def commit(self) -> None:
        """Commit, sync to disk and close (errors named)."""
        with self._named("commit"):
            self.transaction.commit()
            self.transaction = None
            self.environment.sync(True)
            self.meta_info.close()
        self.abort()

    def abort(self) -> None:
        """Close without committing what is pending; never raises (the folder is about to be deleted)."""
        for close in (
            getattr(self.transaction, "abort", None),
            getattr(self.environment, "close", None),
            getattr(self.meta_info, "close", None),
        ):
            try:
                if close is not None:
                    close()
            except (lmdb.Error, OSError):
                pass  # e.g. meta_info's buffered lines on a full disk
        self.environment = self.transaction = self.meta_info = None


def meta_info_level(run_info: Mapping[str, Any]) -> int:
    """meta_info's last field: the run's PNG compression level, else its JPEG/WebP quality."""
    output = run_info["recipe"]["output"]
    return output["png_compress_level"] if output["format"] == "png" else output["quality"]


class LmdbWriter:
    """Writes pairs into the BasicSR layout under `destination`, appearing as a whole on `close()`.

    Samples must arrive grouped by key (the clean image is stored once per key, or once per pair with `one_lq`).
    `sizes` gives (total image bytes, images) per database (None: gt, else the folder) to size the LMDB maps;
    `level` is meta_info's last field (the PNG compression level, or the JPEG/WebP quality). Each meta_info line carries the image's shape from its header
    (samples must carry `clean_shape` and `degraded_shape`). `partial`: what to record in PARTIAL_EXPORT.json.
    `one_lq`: one `lq.lmdb` for every variant folder (see the module's docstring).
    """

    def __init__(
        self,
        destination: Path,
        folders: Sequence[str],
        sizes: Mapping[str | None, tuple[int, int]],
        level: int,
        partial: Mapping[str, Any] | None = None,
        one_lq: bool = False,
    ) -> None:
        names = [lq_name(folder) for folder in folders]  # checked before anything is created
        if one_lq:  # gt: the clean image once per pair; lq: every folder's images
            pairs = len(folders)
            layout = {
                None: (GT_NAME, (sizes[None][0] * pairs, sizes[None][1] * pairs)),
                ONE_LQ_NAME: (ONE_LQ_NAME, tuple(map(sum, zip(*(sizes[folder] for folder in folders))))),
            }
        else:
            layout = {folder: (name, sizes[folder]) for folder, name in zip((None, *folders), (GT_NAME, *names))}
        self._folder = StagedFolder(destination)
        self._partial = partial
        self.level = level
        self.one_lq = one_lq
        self._databases: dict[str | None, _Database] = {}  # None: gt, else the variant folder (or ONE_LQ_NAME)
        try:
            for database, (name, (payload, entries)) in layout.items():
                self._databases[database] = _Database(self._folder.stage / name, payload, entries)
        except BaseException:
            self.abort()
            raise
        self._last_key: str | None = None

    @classmethod
    def open(cls, target: ExportTarget) -> LmdbWriter:
        return cls(
            target.destination,
            target.folders,
            target.bytes_per_database,
            meta_info_level(target.run_info),
            target.partial,
            target.one_lq,
        )

    def how_to_read(self) -> str:
        lq = f", dataroot_lq {self._folder.path}/{ONE_LQ_NAME}" if self.one_lq else ""
        return f"BasicSR PairedImageDataset, io_backend type lmdb: dataroot_gt {self._folder.path}/{GT_NAME}{lq}"

    def write(self, sample: EncodedSample) -> None:
        key = flat_key(sample.key)
        if sample.clean_shape is None or sample.degraded_shape is None:
            raise ValueError(f"key {sample.key!r}: a sample needs its image shapes for meta_info")
        if self.one_lq:
            key = f"{key}/{flat_key(sample.folder)}"
            if len(key) > MAX_KEY_BYTES:
                raise ValueError(
                    f"key {sample.key!r} of folder {sample.folder!r}: the pair key {key!r} is longer "
                    f"than LMDB's {MAX_KEY_BYTES} bytes; export without the one-LQ layout"
                )
            self._databases[None].put(key, sample.clean, self._meta_line(key, sample.extension, sample.clean_shape))
            self._databases[ONE_LQ_NAME].put(
                key, sample.degraded, self._meta_line(key, sample.extension, sample.degraded_shape)
            )
            return
        if sample.key != self._last_key:
            self._databases[None].put(key, sample.clean, self._meta_line(key, sample.extension, sample.clean_shape))
            self._last_key = sample.key
        self._databases[sample.folder].put(
            key, sample.degraded, self._meta_line(key, sample.extension, sample.degraded_shape)
        )

    def _meta_line(self, key: str, extension: str, shape: tuple[int, int, int]) -> str:
        height, width, channels = shape
        return f"{key}.{extension} ({height},{width},{channels}) {self.level}\n"

    def close(self) -> None:
        for database in self._databases.values():
            database.commit()
        self._databases = {}
        if self._partial is not None:
            self._folder.record_partial(self._partial)
        self._folder.commit()

    def abort(self) -> None:
        """Remove the staging folder and release the destination; never raises for the databases' own errors."""
        try:
            for database in self._databases.values():
                database.abort()
            self._databases = {}
        finally:
            self._folder.discard()
