"""`output.layout: folders`: clean/<key>.<ext>, degraded/<folder>/<key>.<ext>, written atomically, each sample's
manifest line last; and what earlier runs finished (docs/output.md)."""

from __future__ import annotations

from collections.abc import Container, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from mdsd3_cli.dataset.encoding import FileDigest, ImageFormat, check_pixels, digest, encode_image, file_digest_fields
from mdsd3_cli.dataset.layout_writer import LayoutWriter, Plan, Sample
from mdsd3_cli.dataset.output_paths import OutputPaths
from mdsd3_cli.dataset.reader import manifest_entries
from mdsd3_cli.dataset.shard_log import ErrorLine, ShardLog, json_line
from mdsd3_cli.recipe.generate import OutputSection
from mdsd3_cli.util.atomic import atomic_write


def _resolved(value: FileDigest) -> Future[FileDigest]:
    future: Future[FileDigest] = Future()
    future.set_result(value)
    return future


class FoldersWriter(LayoutWriter):
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
        self.layout = OutputPaths(out_dir, fmt)
        self.shard = shard
        self.fmt: ImageFormat = fmt
        self.quality = quality
        self.png_compress_level = png_compress_level
        self.written = 0
        self.errors = 0
        self.bytes_written = 0
        self._log = ShardLog(self.layout, shard)  # open for the writer's lifetime
        self._in_flight: set[tuple[str, str]] = set()
        self._clean_written: dict[str, FileDigest] = {}
        self._clean_writing: dict[str, Future[FileDigest]] = {}

    @classmethod
    def open(cls, out_dir: Path, shard: str, output: OutputSection, plan: Plan) -> FoldersWriter:
        return cls(out_dir, shard, output.format, output.quality, output.png_compress_level, output.workers)

    @classmethod
    def completed(
        cls, out_dir: Path, shard: str, output: OutputSection, plan: Plan
    ) -> tuple[set[Sample], dict[str, ErrorLine]]:
        """Every finished sample in the output (any shard's); failed inputs are all retried."""
        return completed_samples(out_dir), {}

    def submit(self, record: Mapping[str, Any], clean: np.ndarray, degraded: np.ndarray) -> None:
        """Queue one sample; `record` needs `key` and `folder` and gains the `clean`/`degraded` paths."""
        self._check_open()
        key, folder = record["key"], record["folder"]
        clean_path, degraded_path = self.layout.clean_path(key), self.layout.degraded_path(folder, key)
        check_pixels(clean, "clean")
        check_pixels(degraded, "degraded")
        located = {**record, "clean": self.layout.relative(clean_path), "degraded": self.layout.relative(degraded_path)}
        json_line(located)  # a record that cannot be written fails here, in the caller
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
        self._log.record_error(key, path, reason)
        with self._lock:
            self.errors += 1

    def _release(self) -> None:
        self._log.close()

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
            line = json_line(
                {
                    **record,
                    **file_digest_fields("clean", *clean_digest),
                    **file_digest_fields("degraded", *digest(degraded_bytes)),
                }
            )
            self._log.append_records([line])
            with self._lock:
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


def completed_samples(out_dir: str | Path, keys: Container[str] | None = None) -> set[Sample]:
    """(key, folder) pairs finished by any shard: a manifest line whose clean and degraded files exist.

    Reads every manifest (so a different shard count still sees earlier work), ignoring corrupt or unfinished
    lines and webdataset records (a tar, not files, holds their images); writes nothing. `keys` limits the result
    (and the file checks) to those keys.
    """
    root = Path(out_dir)
    finished: set[Sample] = set()
    clean_exists: dict[str, bool] = {}
    for entry in manifest_entries(root):
        record = entry.record
        if entry.in_tar:
            continue
        key, folder, clean, degraded = record["key"], record["folder"], record["clean"], record["degraded"]
        if (keys is not None and key not in keys) or (key, folder) in finished:
            continue
        if clean not in clean_exists:
            clean_exists[clean] = (root / clean).is_file()
        if clean_exists[clean] and (root / degraded).is_file():
            finished.add((key, folder))
    return finished
