"""Output I/O (issue 27 items 3, 6, 9 and its low items; issue 30 item 6): unique temp names and one writer per
report, a full disk or `ulimit -f` named with its path and cleaned up after, `init` never writes through a link,
exports get the umask's modes."""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from mdsd3_cli.util import atomic
from mdsd3_cli.util.atomic import AtomicFile, current_umask
from mdsd3_cli.util.output_lock import OutputLock, lock_path

from .helpers import FOLDERS, REPO, mdsd3


def leftovers(folder: Path) -> list[str]:
    """Temp files, staging folders and lock files anywhere under `folder`."""
    return sorted(
        str(path.relative_to(folder)) for path in folder.rglob("*") if path.name.endswith((".tmp", ".partial", ".lock"))
    )


# item 3: unique temp names, one writer per output


def test_two_writers_of_one_name_keep_their_own_temp_files(tmp_path):
    first, second = AtomicFile(tmp_path / "report.json"), AtomicFile(tmp_path / "report.json")
    first.file.write(b"first")
    second.file.write(b"second")
    first.commit()  # the fixed temp name made the second writer unlink the first's temp file: this failed
    second.commit()
    assert (tmp_path / "report.json").read_bytes() == b"second"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.json"]


def test_a_killed_writers_temp_file_goes_when_its_name_is_written_again(tmp_path):
    (tmp_path / ".a.png.k1ll3d0x.tmp").write_bytes(b"half a png")  # a killed run writing a.png
    (tmp_path / ".b.png.l1v3w0rk.tmp").write_bytes(b"in flight")  # another process writing b.png now
    script = f"from mdsd3_cli.util.atomic import atomic_write; atomic_write({str(tmp_path / 'a.png')!r}, b'png')"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert sorted(path.name for path in tmp_path.iterdir()) == [".b.png.l1v3w0rk.tmp", "a.png"]


@pytest.mark.parametrize("command", ["evaluate", "preview", "calibrate"])
def test_a_second_writer_of_one_report_is_refused(folders_dataset, tmp_path, command):
    out = tmp_path / ("report" if command == "evaluate" else "sheet.png" if command == "preview" else "r.yaml")
    arguments = {
        "evaluate": ["--dataset", str(folders_dataset), "--workers", "1"],
        "preview": ["--dataset", str(folders_dataset), "--n", "1"],
        "calibrate": ["--config", str(tmp_path / "missing.yaml"), "--reference", str(folders_dataset)],
    }
    with OutputLock(out, "output"):  # another mdsd3 process writing this output
        result = mdsd3(command, *arguments[command], "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "another mdsd3 process is writing" in result.output and str(out.name) in result.output
    assert not os.path.lexists(out)
    assert command != "preview" or mdsd3(command, *arguments[command], "--out", str(out)).exit_code == 0
    assert not lock_path(out, "output").exists()


# item 6: a full disk, `ulimit -f`


class _FillingFile(io.FileIO):
    """A file on a disk that is full once `budget[0]` bytes are written (every later write fails too)."""

    budget = [0]

    def write(self, data) -> int:
        if len(data) > self.budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget[0] -= len(data)
        return super().write(data)


def _fill_disk_after(monkeypatch, budget: int) -> None:
    """Files written through `atomic` (temp files, tars, Parquet) fail with ENOSPC after `budget` bytes."""
    _FillingFile.budget = [budget]
    real_fdopen = os.fdopen

    def fdopen(descriptor: int, mode: str = "r", *arguments, **options):
        if mode != "wb":
            return real_fdopen(descriptor, mode, *arguments, **options)
        return io.BufferedWriter(_FillingFile(descriptor, "wb"))

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)


class _FullEnvironment:
    """An LMDB environment whose disk is full: commits (and aborts) raise lmdb.DiskError."""

    def __init__(self, environment):
        self._environment = environment

    def begin(self, write=False):
        return _FullTransaction(self._environment.begin(write=write))

    def __getattr__(self, name):
        return getattr(self._environment, name)


class _FullTransaction:
    def __init__(self, transaction):
        self._transaction = transaction

    def put(self, *arguments, **options):
        return self._transaction.put(*arguments, **options)

    def commit(self):
        self._transaction.abort()
        raise lmdb.DiskError("mdb_txn_commit: No space left on device")

    def abort(self):
        self._transaction.abort()
        raise lmdb.DiskError("mdb_txn_abort: No space left on device")


@pytest.mark.parametrize("to", ["webdataset", "lmdb", "parquet"])
def test_export_on_a_full_disk_names_the_file_and_leaves_nothing(folders_dataset, tmp_path, monkeypatch, to):
    if to == "lmdb":
        real_open = lmdb.open
        monkeypatch.setattr(
            lmdb, "open", lambda *arguments, **options: _FullEnvironment(real_open(*arguments, **options))
        )
    else:
        _fill_disk_after(monkeypatch, 20_000)
    destination = tmp_path / "exports" / "out"
    result = mdsd3("export", "--dataset", str(folders_dataset), "--to", to, str(destination))
    assert result.exit_code == 2, result.output
    assert "the disk is full" in result.output and str(destination.parent) in result.output.replace("\n", "")
    assert "Traceback" not in result.output
    assert not destination.exists() and leftovers(tmp_path) == []  # no staging folder, lock or temp file


def test_a_write_over_the_file_size_limit_names_the_file(tmp_path):
    """`ulimit -f`: generate's manifest append (and any atomic write) says which file and why, and leaves no temp
    file."""
    script = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
import numpy as np
from mdsd3_cli.dataset.folders_writer import FoldersWriter
from mdsd3_cli.util.atomic import atomic_write
pixels = np.full((16, 16, 3), 7, dtype=np.uint8)
try:
    with FoldersWriter({str(tmp_path / "out")!r}, "shard-00000-of-00001") as writer:
        writer.submit({{"key": "a", "folder": "rain", "prompt": "x" * 3000}}, pixels, pixels)
except OSError as error:
    print(error)
try:
    atomic_write({str(tmp_path / "big.bin")!r}, bytes(3000))
except OSError as error:
    print(error)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    manifest = tmp_path / "out" / "manifest" / "shard-00000-of-00001.jsonl"
    assert lines == [
        f"cannot write {manifest}: the file is larger than this process may write (file size limit, `ulimit -f`)",
        f"cannot write {tmp_path / 'big.bin'}: the file is larger than this process may write (file "
        "size limit, `ulimit -f`)",
    ]
    assert [path.name for path in tmp_path.rglob("*.tmp")] == []


def test_export_under_the_file_size_limit_leaves_no_temp_tar(folders_dataset, tmp_path):
    destination = tmp_path / "wds"
    script = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
from mdsd3_cli.cli import app
app(["export", "--dataset", {str(folders_dataset)!r}, "--to", "webdataset", {str(destination)!r}])
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "file size limit" in result.stderr and ".tar" in result.stderr and "Traceback" not in result.stderr
    assert not destination.exists() and leftovers(tmp_path) == []


# item 9: init never writes through a link


def test_init_never_writes_through_a_link(tmp_path):
    dangling = tmp_path / "recipe.yaml"
    dangling.symlink_to(tmp_path / "elsewhere.yaml")
    result = mdsd3("init", str(dangling))
    assert result.exit_code == 2 and "exists (a symbolic link)" in result.output
    assert not (tmp_path / "elsewhere.yaml").exists()

    victim = tmp_path / "victim.yaml"
    victim.write_text("mine\n")
    linked = tmp_path / "linked.yaml"
    linked.symlink_to(victim)
    assert mdsd3("init", str(linked), "--force").exit_code == 0
    assert victim.read_text() == "mine\n"
    assert not linked.is_symlink() and "variants" in linked.read_text()


# low: exports follow the umask


@pytest.mark.parametrize("to", ["webdataset", "lmdb", "parquet"])
def test_exports_get_the_umask_modes(folders_dataset, tmp_path, to):
    previous = os.umask(0o022)
    current_umask.cache_clear()
    try:
        destination = tmp_path / "out"
        assert mdsd3("export", "--dataset", str(folders_dataset), "--to", to, str(destination)).exit_code == 0
    finally:
        os.umask(previous)
        current_umask.cache_clear()
    modes = {
        str(path.relative_to(tmp_path)): stat.S_IMODE(path.stat().st_mode)
        for path in [destination, *destination.rglob("*")]
    }
    assert modes["out"] == 0o755  # mkdtemp's 0700 before
    assert all(mode in (0o644, 0o755) for mode in modes.values()), modes
    assert FOLDERS


# low: SIGTERM during evaluate


def test_sigterm_during_evaluate_stops_cleanly(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for side in ("clean", "degraded"):
        (tmp_path / side).mkdir()
    rows, columns = np.indices((256, 256))
    for index in range(400):  # 256 px: measuring takes seconds even on a quiet machine (96 px took 1 s in all)
        pixels = np.stack(
            [(rows * (index + 1) + columns) % 256, (rows + columns * 3) % 256, (rows ^ columns) % 256], axis=-1
        ).astype(np.uint8)
        pixels[rng.integers(0, 256, 64), rng.integers(0, 256, 64)] = 255
        Image.fromarray(pixels).save(tmp_path / "clean" / f"{index:03d}.png", compress_level=1)
        Image.fromarray(255 - pixels).save(tmp_path / "degraded" / f"{index:03d}.png", compress_level=1)
    out = tmp_path / "report"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mdsd3_cli",
            "evaluate",
            "--pairs",
            str(tmp_path / "clean"),
            str(tmp_path / "degraded"),
            "--out",
            str(out),
            "--workers",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    while process.poll() is None and not list(out.glob(".samples.csv.*")):  # measuring has begun
        time.sleep(0.01)
    time.sleep(0.5)  # the workers are busy: before, they printed BrokenPipeError tracebacks once the parent died
    process.terminate()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stdout + stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr
    assert "stopped by SIGTERM" in stderr
    assert os.listdir(out) == [] and leftovers(tmp_path) == []
