"""Output layout, deterministic encoding, atomic writes, manifest repair and resume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin
from skimage import data

from mdsd3_cli.dataset import folders_writer as writer_module
from mdsd3_cli.dataset.encoding import encode_image
from mdsd3_cli.dataset.folders_writer import FoldersWriter, completed_samples
from mdsd3_cli.dataset.output_paths import OutputPathError, OutputPaths
from mdsd3_cli.dataset.run_record import OutputConflictError, check_run_compatible, write_run_json

ASTRONAUT = data.astronaut()


def sample_pixels(index: int) -> tuple[np.ndarray, np.ndarray]:
    """Clean and degraded pixels of test sample `index`: crops of a real photo (same formula as KILLED_RUN)."""
    clean = np.ascontiguousarray(ASTRONAUT[index % 256 : index % 256 + 64, :64])
    return clean, 255 - clean


def manifest_records(out_dir: Path) -> list[dict]:
    manifests = sorted(out_dir.glob("manifest/*.jsonl"))
    return [json.loads(line) for path in manifests for line in path.read_text().splitlines()]


def temp_files(out_dir: Path) -> list[Path]:
    return [path for path in out_dir.rglob("*") if path.name.endswith(".tmp")]


def decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# --- layout --------------------------------------------------------------------------------------------


def test_layout_paths(tmp_path: Path) -> None:
    layout = OutputPaths(tmp_path / "out", "jpeg")
    root = (tmp_path / "out").resolve()
    assert layout.clean_path("div2k/0001") == root / "clean" / "div2k" / "0001.jpg"
    assert layout.degraded_path("rain", "div2k/0001") == root / "degraded" / "rain" / "div2k" / "0001.jpg"
    assert layout.manifest_path("3of8") == root / "manifest" / "3of8.jsonl"
    assert layout.errors_path("3of8") == root / "errors" / "3of8.jsonl"
    assert layout.run_json == root / "run.json"
    assert layout.relative(layout.clean_path("a/b")) == "clean/a/b.jpg"


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "a//b", "a/../../b", "", "line\nbreak"])
def test_layout_rejects_unsafe_keys(tmp_path: Path, key: str) -> None:
    layout = OutputPaths(tmp_path)
    with pytest.raises(OutputPathError):
        layout.clean_path(key)
    with pytest.raises(OutputPathError):
        layout.degraded_path("rain", key)


@pytest.mark.parametrize("name", ["../up", "a/b", "", ".."])
def test_layout_rejects_unsafe_folder_and_shard_names(tmp_path: Path, name: str) -> None:
    layout = OutputPaths(tmp_path)
    with pytest.raises(OutputPathError):
        layout.degraded_path(name, "key")
    with pytest.raises(OutputPathError):
        layout.manifest_path(name)


def test_layout_rejects_symlinked_folders_pointing_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out" / "clean").mkdir(parents=True)
    (tmp_path / "out" / "clean" / "evil").symlink_to(outside)
    (tmp_path / "out" / "degraded").symlink_to(outside)
    layout = OutputPaths(tmp_path / "out")
    with pytest.raises(OutputPathError, match="outside the output folder"):
        layout.clean_path("evil/x")
    with pytest.raises(OutputPathError):
        layout.degraded_path("rain", "x")
    assert layout.clean_path("fine/x").name == "x.png"


# --- encoding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encoding_is_deterministic(fmt: str) -> None:
    first = encode_image(ASTRONAUT, fmt, 90, 1)
    assert first == encode_image(ASTRONAUT.copy(), fmt, 90, 1)
    decoded = decode_bytes(first)
    assert decoded.shape == ASTRONAUT.shape and np.abs(decoded.astype(int) - ASTRONAUT).mean() < 3


def decode_bytes(encoded: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(encoded)) as image:
        return np.asarray(image.convert("RGB"))


def test_png_is_lossless_and_carries_no_metadata() -> None:
    encoded = encode_image(ASTRONAUT, "png", 95, 1)
    np.testing.assert_array_equal(decode_bytes(encoded), ASTRONAUT)
    chunks, position = [], 8
    while position < len(encoded):
        length = int.from_bytes(encoded[position : position + 4], "big")
        chunks.append(encoded[position + 4 : position + 8])
        position += 12 + length
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}


def test_jpeg_chroma_subsampling_follows_quality() -> None:
    for quality, sampling in ((95, 0), (80, 2)):
        with Image.open(io.BytesIO(encode_image(ASTRONAUT, "jpeg", quality, 1))) as image:
            assert JpegImagePlugin.get_sampling(image) == sampling


def test_encoding_rejects_wrong_arrays() -> None:
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        encode_image(ASTRONAUT.astype(np.float32), "png", 95, 1)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        encode_image(ASTRONAUT[..., 0], "png", 95, 1)


# --- writing -------------------------------------------------------------------------------------------


def test_samples_share_one_clean_image_and_get_manifest_lines(tmp_path: Path, monkeypatch) -> None:
    encoded: list[int] = []
    real_encode = writer_module.encode_image
    monkeypatch.setattr(writer_module, "encode_image", lambda pixels, *a: encoded.append(1) or real_encode(pixels, *a))
    with FoldersWriter(tmp_path, "0of1", workers=3) as writer:
        for folder in ("rain", "haze", "snow"):
            for index, key in enumerate(("div2k/0001", "div2k/0002")):
                clean, degraded = sample_pixels(index)
                writer.submit({"key": key, "folder": folder, "alpha": 0.9}, clean, degraded)
    assert len(encoded) == 2 + 6
    assert (writer.written, writer.errors) == (6, 0)
    assert writer.bytes_written == sum(p.stat().st_size for p in tmp_path.rglob("*.png"))
    records = manifest_records(tmp_path)
    assert sorted((r["key"], r["folder"]) for r in records) == sorted(
        (key, folder) for folder in ("rain", "haze", "snow") for key in ("div2k/0001", "div2k/0002")
    )
    first = next(r for r in records if r["key"] == "div2k/0002" and r["folder"] == "snow")
    clean_bytes, degraded_bytes = (
        (tmp_path / "clean/div2k/0002.png").read_bytes(),
        (tmp_path / "degraded/snow/div2k/0002.png").read_bytes(),
    )
    assert first == {
        "alpha": 0.9,
        "clean": "clean/div2k/0002.png",
        "degraded": "degraded/snow/div2k/0002.png",
        "folder": "snow",
        "key": "div2k/0002",
        "clean_sha256": hashlib.sha256(clean_bytes).hexdigest(),
        "clean_bytes": len(clean_bytes),
        "degraded_sha256": hashlib.sha256(degraded_bytes).hexdigest(),
        "degraded_bytes": len(degraded_bytes),
    }
    assert len({r["clean_sha256"] for r in records if r["key"] == "div2k/0002"}) == 1  # shared clean image
    clean, degraded = sample_pixels(1)
    np.testing.assert_array_equal(decode(tmp_path / first["clean"]), clean)
    np.testing.assert_array_equal(decode(tmp_path / first["degraded"]), degraded)
    line = (tmp_path / "manifest" / "0of1.jsonl").read_text().splitlines()[0]
    assert list(json.loads(line)) == sorted(json.loads(line))


def test_resumed_key_replaces_temp_files_left_by_a_killed_run(tmp_path: Path) -> None:
    clean, degraded = sample_pixels(0)
    with FoldersWriter(tmp_path, "0of1") as writer:
        writer.submit({"key": "a", "folder": "rain"}, clean, degraded)
    clean_bytes = (tmp_path / "clean" / "a.png").read_bytes()
    (tmp_path / "clean" / ".a.png.tmp").write_bytes(b"half a png")  # killed while rewriting the clean image
    (tmp_path / "degraded" / "haze").mkdir()
    (tmp_path / "degraded" / "haze" / ".a.png.tmp").write_bytes(b"half a png")

    assert completed_samples(tmp_path) == {("a", "rain")}
    with FoldersWriter(tmp_path, "0of1") as writer:
        writer.submit({"key": "a", "folder": "haze"}, clean, degraded)
    assert temp_files(tmp_path) == [] and (tmp_path / "clean" / "a.png").read_bytes() == clean_bytes
    assert completed_samples(tmp_path) == {("a", "rain"), ("a", "haze")}


def test_many_concurrent_submits_write_every_line_once(tmp_path: Path) -> None:
    with FoldersWriter(tmp_path, "7of8", workers=4) as writer:
        for index in range(120):
            clean, degraded = sample_pixels(index)
            writer.submit({"key": f"k{index // 3:03d}", "folder": f"v{index % 3}"}, clean, degraded)
    pairs = [(r["key"], r["folder"]) for r in manifest_records(tmp_path)]
    assert len(pairs) == len(set(pairs)) == 120
    assert len(list((tmp_path / "clean").iterdir())) == 40
    assert temp_files(tmp_path) == []


def test_failed_encoding_leaves_no_final_file_and_no_manifest_line(tmp_path: Path, monkeypatch) -> None:
    real_encode = writer_module.encode_image

    def encode_failing_on_degraded(pixels, *args):
        if pixels[0, 0, 0] == 255 - ASTRONAUT[0, 0, 0]:
            raise RuntimeError("encoder crashed")
        return real_encode(pixels, *args)

    monkeypatch.setattr(writer_module, "encode_image", encode_failing_on_degraded)
    clean, degraded = sample_pixels(0)
    writer = FoldersWriter(tmp_path, "0of1")
    writer.submit({"key": "a", "folder": "rain"}, clean, degraded)
    with pytest.raises(RuntimeError, match="encoder crashed") as caught:
        writer.close()
    assert "key='a' folder='rain'" in " ".join(caught.value.__notes__)
    assert not (tmp_path / "degraded" / "rain" / "a.png").exists()
    assert (tmp_path / "manifest" / "0of1.jsonl").read_bytes() == b""

    monkeypatch.setattr(writer_module, "encode_image", real_encode)
    assert completed_samples(tmp_path) == set()
    with FoldersWriter(tmp_path, "0of1") as writer:
        writer.submit({"key": "a", "folder": "rain"}, clean, degraded)
    assert [r["key"] for r in manifest_records(tmp_path)] == ["a"] and temp_files(tmp_path) == []


def test_failed_disk_write_keeps_final_names_absent(tmp_path: Path, monkeypatch) -> None:
    def full_disk(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    clean, degraded = sample_pixels(0)
    with pytest.raises(OSError, match="the disk is full"), FoldersWriter(tmp_path, "0of1") as writer:
        writer.submit({"key": "a", "folder": "rain"}, clean, degraded)
    assert list((tmp_path / "clean").iterdir()) == [] and temp_files(tmp_path) == []


def test_worker_failure_stops_further_submits(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(writer_module, "encode_image", lambda *args: 1 / 0)
    clean, degraded = sample_pixels(0)
    with pytest.raises(ZeroDivisionError), FoldersWriter(tmp_path, "0of1") as writer:
        writer.submit({"key": "a", "folder": "rain"}, clean, degraded)
        writer.drain()
    with pytest.raises(ZeroDivisionError):
        writer.submit({"key": "b", "folder": "rain"}, clean, degraded)


def test_bad_records_fail_in_the_caller(tmp_path: Path) -> None:
    clean, degraded = sample_pixels(0)
    with FoldersWriter(tmp_path, "0of1") as writer:
        with pytest.raises(TypeError):
            writer.submit({"key": "a", "folder": "rain", "ratio": np.float32(0.5)}, clean, degraded)
        with pytest.raises(ValueError):
            writer.submit({"key": "a", "folder": "rain", "ratio": float("nan")}, clean, degraded)
        with pytest.raises(OutputPathError):
            writer.submit({"key": "../a", "folder": "rain"}, clean, degraded)
        with pytest.raises(ValueError, match="HxWx3 uint8"):
            writer.submit({"key": "a", "folder": "rain"}, clean[..., :2], degraded)
    assert writer.written == 0


def test_backpressure_bounds_samples_in_flight(tmp_path: Path, monkeypatch) -> None:
    release = threading.Event()
    real_encode = writer_module.encode_image
    monkeypatch.setattr(writer_module, "encode_image", lambda *a: release.wait() and real_encode(*a))
    submitted: list[int] = []
    clean, degraded = sample_pixels(0)
    with FoldersWriter(tmp_path, "0of1", workers=1) as writer:

        def producer() -> None:
            for index in range(10):
                writer.submit({"key": f"k{index}", "folder": "rain"}, clean, degraded)
                submitted.append(index)

        thread = threading.Thread(target=producer)
        thread.start()
        time.sleep(0.3)
        assert len(submitted) == 2 * 1 + 4
        with pytest.raises(ValueError, match="already being written"):
            writer.submit({"key": "k0", "folder": "rain"}, clean, degraded)
        release.set()
        thread.join(5)
    assert writer.written == 10


def test_two_shards_write_into_one_folder(tmp_path: Path) -> None:
    def run_shard(shard: str, keys: range) -> None:
        with FoldersWriter(tmp_path, shard) as writer:
            for index in keys:
                clean, degraded = sample_pixels(index)
                writer.submit({"key": f"k{index:02d}", "folder": "rain"}, clean, degraded)

    threads = [
        threading.Thread(target=run_shard, args=("0of2", range(0, 20))),
        threading.Thread(target=run_shard, args=("1of2", range(20, 40))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len((tmp_path / "manifest" / "0of2.jsonl").read_text().splitlines()) == 20
    assert len((tmp_path / "manifest" / "1of2.jsonl").read_text().splitlines()) == 20
    # a rerun with another shard count sees both; reading the manifests writes nothing
    assert completed_samples(tmp_path) == {(f"k{index:02d}", "rain") for index in range(40)}
    assert completed_samples(tmp_path, keys={"k03", "k33"}) == {("k03", "rain"), ("k33", "rain")}
    assert sorted(path.name for path in (tmp_path / "manifest").iterdir()) == ["0of2.jsonl", "1of2.jsonl"]
    assert completed_samples(tmp_path / "nothing_yet") == set() and not (tmp_path / "nothing_yet").exists()


# --- manifest, resume, errors --------------------------------------------------------------------------


def test_partial_manifest_line_is_cut_on_open(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest" / "0of1.jsonl"
    manifest.parent.mkdir()
    good = b'{"clean":"clean/a.png","degraded":"degraded/r/a.png","folder":"r","key":"a"}\n'
    manifest.write_bytes(good * 2 + b'{"clean":"clean/b.png","deg')
    FoldersWriter(tmp_path, "0of1").close()
    assert manifest.read_bytes() == good * 2

    manifest.write_bytes(good + b"x" * 200_000)  # partial line longer than one read-back chunk
    FoldersWriter(tmp_path, "0of1").close()
    assert manifest.read_bytes() == good

    manifest.write_bytes(b'{"key":')
    FoldersWriter(tmp_path, "0of1").close()
    assert manifest.read_bytes() == b""


def test_completed_needs_both_files_and_skips_corrupt_lines(tmp_path: Path) -> None:
    with FoldersWriter(tmp_path, "0of2") as writer:
        for key in ("a", "b", "c"):
            writer.submit({"key": key, "folder": "rain"}, *sample_pixels(0))
    with FoldersWriter(tmp_path, "1of2") as writer:
        writer.submit({"key": "d", "folder": "haze"}, *sample_pixels(1))
    (tmp_path / "degraded" / "rain" / "b.png").unlink()
    (tmp_path / "clean" / "c.png").unlink()
    with open(tmp_path / "manifest" / "1of2.jsonl", "ab") as manifest:
        manifest.write(b'garbage\n[1, 2]\n{"key": 3}\n\xff\xfe\n')
        manifest.write(b'{"clean":"clean/a.png","degraded":"degraded/rain/a.png","folder":"haze","key":"a"}')
    assert completed_samples(tmp_path) == {("a", "rain"), ("d", "haze")}


def test_errors_file_describes_the_latest_run(tmp_path: Path) -> None:
    with FoldersWriter(tmp_path, "0of1") as writer:
        writer.record_error("old", "/in/old.jpg", "empty file")
    with FoldersWriter(tmp_path, "0of1") as writer:
        writer.record_error("bad", "/in/bad.jpg", "truncated or corrupt image: broken data stream")
        writer.record_error(None, "/in/x/*.jpg", "pattern matches no image files")
    assert writer.errors == 2
    lines = (tmp_path / "errors" / "0of1.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"key": "bad", "path": "/in/bad.jpg", "reason": "truncated or corrupt image: broken data stream"},
        {"key": None, "path": "/in/x/*.jpg", "reason": "pattern matches no image files"},
    ]


KILLED_RUN = """
import sys
from skimage import data
from mdsd3_cli.dataset.folders_writer import FoldersWriter
astronaut = data.astronaut()
with FoldersWriter(sys.argv[1], "0of1", workers=2) as writer:
    for index in range(int(sys.argv[2])):
        clean = astronaut[index % 256 : index % 256 + 64, :64].copy()
        writer.submit({"key": f"k{index:04d}", "folder": "rain"}, clean, 255 - clean)
        writer.submit({"key": f"k{index:04d}", "folder": "haze"}, clean, 255 - clean)
"""


def test_killed_run_resumes_to_the_same_files_and_lines(tmp_path: Path) -> None:
    out, total = tmp_path / "out", 300
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(out), str(total)])
    manifest = out / "manifest" / "0of1.jsonl"
    deadline = time.monotonic() + 600  # generous: on a loaded machine the child may take long to start
    while process.poll() is None and time.monotonic() < deadline:
        if manifest.exists() and manifest.stat().st_size > 4000:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the writer finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL

    for image_path in out.rglob("*.png"):  # nothing under a final name is ever partial
        decode(image_path)
    done = completed_samples(out)
    assert 0 < len(done) < 2 * total
    with FoldersWriter(out, "0of1") as writer:
        for index in range(total):
            clean, degraded = sample_pixels(index)
            for folder in ("rain", "haze"):
                if (f"k{index:04d}", folder) not in done:
                    writer.submit({"key": f"k{index:04d}", "folder": folder}, clean, degraded)

    pairs = [(r["key"], r["folder"]) for r in manifest_records(out)]
    assert sorted(pairs) == sorted((f"k{i:04d}", f) for i in range(total) for f in ("rain", "haze"))
    assert temp_files(out) == []
    for index in (0, total // 2, total - 1):
        clean, degraded = sample_pixels(index)
        assert (out / "clean" / f"k{index:04d}.png").read_bytes() == encode_image(clean, "png", 95, 1)
        assert (out / "degraded" / "haze" / f"k{index:04d}.png").read_bytes() == encode_image(degraded, "png", 95, 1)


# --- run.json --------------------------------------------------------------------------------------------


def test_run_json_identity_check(tmp_path: Path) -> None:
    identity = {"recipe_hash": "abc", "size": 512, "variants": ("rain", "haze")}
    check_run_compatible(tmp_path, identity, overwrite=False)  # nothing there yet
    write_run_json(tmp_path, {"identity": identity, "versions": {"mdsd3": "0.1.0"}})
    assert json.loads((tmp_path / "run.json").read_text())["identity"]["variants"] == ["rain", "haze"]
    check_run_compatible(tmp_path, identity, overwrite=False)

    changed = {**identity, "size": 1024, "model": "sd3", "sampling": {"batch_size": 2}}
    write_run_json(tmp_path, {"identity": {**identity, "sampling": {"batch_size": 4}}})
    with pytest.raises(
        OutputConflictError,
        match=r'model: \(none\) → "sd3"; sampling\.batch_size: 4 → 2; '
        r"size: 512 → 1024; its run\.json → this recipe",
    ) as caught:
        check_run_compatible(tmp_path, changed, overwrite=False)
    assert str(tmp_path) in str(caught.value)
    check_run_compatible(tmp_path, changed, overwrite=True)

    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(OutputConflictError, match=r"unreadable run\.json"):
        check_run_compatible(tmp_path, identity, overwrite=False)
    with pytest.raises(ValueError, match="identity"):
        write_run_json(tmp_path, {"versions": {}})
    assert temp_files(tmp_path) == []


def test_run_conflict_names_the_differing_field_inside_lists_and_long_values(tmp_path: Path) -> None:
    variant = {"alpha": 0.3, "beta": 0.8, "classes": {"haze": [0.2, 0.8], "rain": 0.0}, "repeats": 1}
    source = "/data/photos/" + "x" * 80
    stored = {"input": source + "/a", "variants": [{**variant, "name": "identity"}, {**variant, "name": "rain"}]}
    write_run_json(tmp_path, {"identity": stored})
    changed = {
        "input": source + "/b",
        "variants": [
            {**variant, "name": "identity_b"},
            {**variant, "name": "rain", "beta": 0.9},
            {**variant, "name": "haze"},
        ],
    }
    with pytest.raises(OutputConflictError) as caught:
        check_run_compatible(tmp_path, changed, overwrite=False)
    message = str(caught.value)
    assert "input: …" in message and 'x/a" → …' in message and 'x/b"' in message  # the differing tail shows
    assert "variants: 2 items → 3 items" in message
    assert 'variants[0].name: "identity" → "identity_b"' in message
    assert "variants[1].beta: 0.8 → 0.9" in message
