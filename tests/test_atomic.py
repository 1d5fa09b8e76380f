"""Safe output: planted links and hard links are never written through, files get the umask's modes,
errors name the path."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest

from mdsd3_cli.dataset.folders_writer import FoldersWriter
from mdsd3_cli.dataset.run_record import write_run_json
from mdsd3_cli.util.atomic import (
    AtomicFile,
    UnsafeOutputError,
    atomic_write,
    current_umask,
    file_mode,
    fresh_folder,
    open_append,
)

PIXELS = np.full((16, 16, 3), 7, dtype=np.uint8)


@pytest.fixture()
def victim(tmp_path):
    path = tmp_path / "outside" / "victim"
    path.parent.mkdir()
    path.write_bytes(b"X\n")
    return path


def plant(kind: str, at, victim) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    if kind == "symlink":
        at.symlink_to(victim)
    else:
        os.link(victim, at)


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
@pytest.mark.parametrize("where", ["old temp name", "final name"])
def test_images_never_write_through_planted_links(tmp_path, victim, kind, where):
    out = tmp_path / "O"
    final = out / "clean" / "astronaut.png"
    plant(kind, final.with_name(".astronaut.png.tmp") if where == "old temp name" else final, victim)
    with FoldersWriter(out, "shard-00000-of-00001") as writer:
        writer.submit({"key": "astronaut", "folder": "rain"}, PIXELS, PIXELS)
    assert victim.read_bytes() == b"X\n"
    assert not final.is_symlink() and final.stat().st_nlink == 1 and final.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
@pytest.mark.parametrize("name", ["manifest", "errors"])
def test_appends_refuse_links(tmp_path, victim, kind, name):
    out = tmp_path / "O"
    plant(kind, out / name / "shard-00000-of-00001.jsonl", victim)
    with pytest.raises(UnsafeOutputError, match="shard-00000-of-00001.jsonl"):
        FoldersWriter(out, "shard-00000-of-00001")
    assert victim.read_bytes() == b"X\n"


def test_a_linked_sub_folder_leading_outside_is_refused(tmp_path, victim):
    out = tmp_path / "O"
    out.mkdir()
    (out / "clean").symlink_to(victim.parent)
    with pytest.raises(UnsafeOutputError, match="outside the output folder"):
        atomic_write(out / "clean" / "a.png", b"data", root=out)
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim"]


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_run_json_replaces_a_planted_link(tmp_path, victim, kind):
    out = tmp_path / "O"
    plant(kind, out / "run.json", victim)
    write_run_json(out, {"identity": {"a": 1}})
    assert victim.read_bytes() == b"X\n" and not (out / "run.json").is_symlink()
    assert '"a": 1' in (out / "run.json").read_text()


def test_files_get_the_umask_modes(tmp_path):
    previous = os.umask(0o022)
    try:
        current_umask.cache_clear()
        atomic_write(tmp_path / "a.bin", b"1")
        with open_append(tmp_path / "b.jsonl") as file:
            file.write(b"x\n")
        modes = {name: stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("a.bin", "b.jsonl")}
    finally:
        os.umask(previous)
        current_umask.cache_clear()
    assert modes == {"a.bin": 0o644, "b.jsonl": 0o644}


def test_a_failed_write_leaves_nothing_and_names_the_path(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")

    def disk_full(file):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="the disk is full") as caught:
        atomic_write(target, disk_full)
    assert caught.value.filename == str(target) and str(target) in str(caught.value)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_fresh_folder_removes_a_link_without_following_it(tmp_path, victim):
    folder = tmp_path / ".tmp-step-3"
    folder.symlink_to(victim.parent)
    fresh_folder(folder)
    assert folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())
    assert victim.read_bytes() == b"X\n"


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_atomic_file_is_never_seen_partial_and_replaces_leftovers(tmp_path, victim, kind):
    final = tmp_path / "tars" / "a.tar"
    plant(kind, final.with_name(".a.tar.tmp"), victim)  # a killed run's leftover, or a planted link
    streaming = AtomicFile(final, root=tmp_path)
    streaming.file.write(b"part one, ")
    assert not final.exists() and victim.read_bytes() == b"X\n"
    streaming.file.write(b"part two")
    streaming.commit()
    assert final.read_bytes() == b"part one, part two" and stat.S_IMODE(final.stat().st_mode) == file_mode()
    abandoned = AtomicFile(tmp_path / "tars" / "b.tar")
    abandoned.file.write(b"half")
    abandoned.discard()
    assert sorted(p.name for p in final.parent.iterdir()) == ["a.tar"] and victim.read_bytes() == b"X\n"
