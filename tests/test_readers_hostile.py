"""Hostile datasets through the readers (verify, preview, evaluate, train's mdsd3_output source): names that
would become paths, report outputs at links, malformed records, damaged tars, odd image modes and sizes, and a
seeded fuzz. Datasets are built by hand (tiny images, no model), so every test runs in a second or two."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import random
import re
import resource
import shutil
import signal
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from skimage import data

from mdsd3_cli.dataset.manifest import MAX_LINE_BYTES, ManifestLineError, parse_record
from mdsd3_cli.dataset.preview import contact_sheet
from mdsd3_cli.dataset.reader import manifest_lines
from mdsd3_cli.dataset.stored_images import ImageRef
from mdsd3_cli.dataset.verify import verify_dataset
from mdsd3_cli.evaluate import EvaluateError, evaluate_dataset
from mdsd3_cli.evaluate.runner import read_rgb
from mdsd3_cli.recipe.train import Mdsd3OutputDataset
from mdsd3_cli.train.data import BAD_RECORD, UNREADABLE, DataReport, _mdsd3_output, _open_rgb, _PairSkipped
from mdsd3_cli.util.images import load_image
from mdsd3_cli.util.safe_names import safe_component

from .helpers import mdsd3, png_header

SIDE = 24
KEYS = ("astronaut", "coffee")
FOLDERS = ("rain", "haze")
MANIFEST = "manifest/shard-00000-of-00001.jsonl"


def photo(name: str, side: int = SIDE) -> np.ndarray:
    return np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB").resize((side, side)))


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def image_fields(role: str, content: bytes) -> dict[str, Any]:
    return {f"{role}_sha256": hashlib.sha256(content).hexdigest(), f"{role}_bytes": len(content)}


def build_dataset(root: Path, layout: str = "folders") -> Path:
    """A finished two-key, two-variant mdsd3 output as generate writes it (folders or webdataset layout)."""
    (root / "manifest").mkdir(parents=True)
    (root / "run.json").write_text(
        json.dumps(
            {
                "classes": ["rain", "haze"],
                "recipe": {
                    "variants": [{"name": folder, "classes": {folder: 1.0}, "repeats": 1} for folder in FOLDERS]
                },
            }
        )
    )
    lines, members = [], []
    for key in KEYS:
        clean = png_bytes(photo(key))
        for index, folder in enumerate(FOLDERS):
            degraded = png_bytes(np.clip(photo(key).astype(int) + 20 * (index + 1), 0, 255).astype(np.uint8))
            record = {
                "key": key,
                "folder": folder,
                "variant": folder,
                "repeat": 1,
                "size": [SIDE, SIDE],
                "ratios": {"haze": float(folder == "haze"), "rain": float(folder == "rain")},
                **image_fields("clean", clean),
                **image_fields("degraded", degraded),
            }
            if layout == "folders":
                record.update(clean=f"clean/{key}.png", degraded=f"degraded/{folder}/{key}.png")
                for relative, content in ((record["clean"], clean), (record["degraded"], degraded)):
                    (root / relative).parent.mkdir(parents=True, exist_ok=True)
                    (root / relative).write_bytes(content)
            else:
                names = {
                    role: f"{key}.{folder}.{role}.{extension}"
                    for role, extension in (("clean", "png"), ("degraded", "png"), ("json", "json"))
                }
                record.update(
                    tar="tars/shard-000000.tar",
                    clean_member=names["clean"],
                    degraded_member=names["degraded"],
                    json_member=names["json"],
                )
                members += [(names["clean"], clean), (names["degraded"], degraded)]
                members.append((names["json"], json.dumps(record, sort_keys=True).encode()))
            lines.append(json.dumps(record, sort_keys=True) + "\n")
    (root / MANIFEST).write_text("".join(lines))
    if members:
        (root / "tars").mkdir()
        with tarfile.open(root / "tars/shard-000000.tar", "w") as archive:
            for name, content in members:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
    return root


def records(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / MANIFEST).read_text().splitlines()]


def write_records(root: Path, written: list[dict[str, Any]]) -> None:
    (root / MANIFEST).write_text("".join(json.dumps(record) + "\n" for record in written))


def train_pairs(root: Path) -> tuple[list, DataReport]:
    report = DataReport()
    spec = Mdsd3OutputDataset(kind="mdsd3_output", name="set", dir=root)
    return _mdsd3_output(spec, ["rain", "haze"], report), report


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    return build_dataset(tmp_path / "set")


def test_the_hand_built_datasets_are_valid(tmp_path: Path) -> None:
    for layout in ("folders", "webdataset"):
        root = build_dataset(tmp_path / layout, layout)
        assert verify_dataset(root, workers=1).ok, layout
        assert evaluate_dataset(root, workers=1).summary["samples"] == 4 and len(train_pairs(root)[0]) == 4


# ------------------------------------------------------------------ names that become paths (issue 17, item 4)

UNSAFE_NAMES = ["rain.lmdb/../../../x/PWNED", "..", ".", "", "a\\b", "a\0b", "/abs"]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_safe_component_refuses_everything_but_one_plain_name(name: str) -> None:
    with pytest.raises(ValueError, match="variant"):
        safe_component(name, "variant")
    assert safe_component("mix_r2.v1", "variant") == "mix_r2.v1"


@pytest.mark.parametrize("field", ["folder", "variant"])
def test_a_record_naming_a_path_is_refused_by_every_reader(dataset: Path, field: str) -> None:
    written = records(dataset)
    written[0][field] = "rain.lmdb/../../../x/PWNED"
    write_records(dataset, written)
    problems = verify_dataset(dataset, workers=1).problems
    assert [(p.kind, p.where) for p in problems if p.kind == "manifest"] == [("manifest", f"{MANIFEST}:1")]
    assert any(field in p.detail and "PWNED" in p.detail for p in problems)
    report = evaluate_dataset(dataset, workers=1)
    assert report.summary["samples"] == 3 and "PWNED" in report.problems[0].reason
    shown: list[str] = []
    contact_sheet(dataset, cell=32, problems=shown)
    assert any(f"{MANIFEST}:1" in line and "PWNED" in line for line in shown)
    pairs, skipped = train_pairs(dataset)
    assert len(pairs) == 3 and skipped.counts() == {BAD_RECORD: 1}


def test_a_run_json_variant_naming_a_path_fails_verify(dataset: Path) -> None:
    info = json.loads((dataset / "run.json").read_text())
    info["recipe"]["variants"][0]["name"] = "rain.lmdb/../../../x/PWNED"
    (dataset / "run.json").write_text(json.dumps(info))
    problems = verify_dataset(dataset, workers=1).problems
    assert [p.where for p in problems if "recipe.variants[0].name" in p.detail] == ["run.json"]
    result = mdsd3("verify", "--dataset", dataset)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # not a traceback


def test_a_run_json_with_a_billion_repeats_is_refused_not_expanded(dataset: Path) -> None:
    info = json.loads((dataset / "run.json").read_text())
    info["recipe"]["variants"][0]["repeats"] = 10**6
    (dataset / "run.json").write_text(json.dumps(info))
    problems = verify_dataset(dataset, workers=1).problems
    assert any(p.where == "run.json" and "repeats" in p.detail for p in problems), problems


# ------------------------------------------------------------------ report outputs at links (item 7)


def test_preview_replaces_a_link_at_out_instead_of_writing_through_it(dataset: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "sheet.png"
    link.symlink_to(victim)
    result = mdsd3("preview", "--dataset", dataset, "--out", link, "--cell", "32")
    assert result.exit_code == 0, result.output
    assert victim.read_text() == "keep me"
    assert not link.is_symlink() and Image.open(link).size[0] > 0


def test_evaluate_replaces_links_at_every_report_file(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    names = ["samples.csv", "report.json", "normalised_by_variant.png", "strength_vs_ratio.png"]
    for name in names:
        (tmp_path / f"victim-{name}").write_text("keep me")
        (out / name).symlink_to(tmp_path / f"victim-{name}")
    result = mdsd3("evaluate", "--dataset", dataset, "--out", out, "--workers", "1")
    assert result.exit_code == 0, result.output
    for name in names:
        assert (tmp_path / f"victim-{name}").read_text() == "keep me", name
        assert (out / name).is_file() and not (out / name).is_symlink(), name
    assert len((out / "samples.csv").read_text().splitlines()) == 1 + 4


@pytest.mark.parametrize("inside", ["", "reports", "degraded/rain"])
def test_evaluate_refuses_an_out_folder_inside_an_input(dataset: Path, inside: str) -> None:
    out = dataset / inside
    result = mdsd3("evaluate", "--dataset", dataset, "--out", out, "--workers", "1")
    assert result.exit_code == 2 and "inside the input folder" in result.output, result.output
    assert not (out / "samples.csv").exists()


# ------------------------------------------------------------------ preview skips and names (medium items)


def test_preview_skips_and_names_malformed_records_and_unreadable_images(dataset: Path, tmp_path: Path) -> None:
    written = records(dataset)
    del written[0]["ratios"]
    written[1]["size"] = "24x24"
    del written[2]["degraded_bytes"]  # as in an older manifest: the size check passes, the bomb guard refuses it
    write_records(dataset, written)
    (dataset / written[2]["degraded"]).write_bytes(png_header(30000, 30000))
    (dataset / written[3]["degraded"]).unlink()
    result = mdsd3("preview", "--dataset", dataset, "--out", tmp_path / "sheet.png", "--cell", "32")
    assert result.exit_code == 0 and result.exception is None, result.output
    output = " ".join(result.output.split())  # rich wraps long lines
    for expected in (
        f"{MANIFEST}:1: 'ratios'",
        f"{MANIFEST}:2: 'size'",
        "decompression bomb guard",
        f"{written[3]['degraded']}: file not found",
    ):
        assert expected in output, (expected, output)


def rewrite_tar(path: Path, change: str) -> None:
    """Rewrite a tar with its first image member missing, turned into a link, or the whole tar cut or emptied."""
    if change in ("truncated", "empty"):
        content = path.read_bytes()
        path.write_bytes(content[:700] if change == "truncated" else b"")
        return
    with tarfile.open(path, "r:") as archive:
        members = [(member, archive.extractfile(member).read()) for member in archive.getmembers()]
    with tarfile.open(path, "w") as archive:
        for index, (member, content) in enumerate(members):
            if index == 1 and change == "link":
                link = tarfile.TarInfo(member.name)
                link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
                archive.addfile(link)
            elif index != 1:
                archive.addfile(member, io.BytesIO(content))


@pytest.mark.parametrize("change", ["missing", "link", "truncated", "empty"])
def test_damaged_tars_are_skipped_and_named_by_preview_evaluate_and_train(tmp_path: Path, change: str) -> None:
    root = build_dataset(tmp_path / "set", "webdataset")
    rewrite_tar(root / "tars/shard-000000.tar", change)
    shown: list[str] = []
    contact_sheet(root, cell=32, problems=shown)
    assert shown and all("shard-000000.tar" in line for line in shown), shown
    try:
        report = evaluate_dataset(root, workers=1)
        assert report.problems and report.summary["samples"] < 4
    except EvaluateError as error:  # nothing readable at all
        assert "none of its 4 pairs could be read" in str(error)
    pairs, _ = train_pairs(root)
    with pytest.raises(_PairSkipped) as skipped:
        _open_rgb(pairs[0].degraded, "set")
    assert skipped.value.skip.reason == UNREADABLE and "shard-000000.tar" in skipped.value.skip.detail


# ------------------------------------------------------------------ verify messages (medium items)


def test_verify_names_the_manifest_line_and_field_of_a_nul_byte(dataset: Path) -> None:
    written = records(dataset)
    written[1]["degraded"] = "degraded/rain/a\0b.png"
    write_records(dataset, written)
    problems = [p for p in verify_dataset(dataset, workers=1).problems if p.kind == "manifest"]
    assert [p.where for p in problems] == [f"{MANIFEST}:2"] and "field degraded" in problems[0].detail
    result = mdsd3("verify", "--dataset", dataset)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # not a traceback


def test_an_overlong_manifest_line_is_refused_without_being_held(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"key": "' + b"x" * (3 * MAX_LINE_BYTES) + b'"}\n{"key": 1}\n')
    lines = list(manifest_lines(path))
    assert [number for number, _, _ in lines] == [1, 2] and len(lines[0][2]) == MAX_LINE_BYTES + 1
    assert [offset for _, offset, _ in lines] == [0, path.read_bytes().index(b"\n") + 1]  # past the whole long line
    with pytest.raises(ManifestLineError, match="longer than"):
        parse_record(lines[0][2])


# ------------------------------------------------------------------ evaluate: sizes and decoding (medium items)


def test_evaluate_leaves_out_too_small_pairs_with_a_reason(tmp_path: Path) -> None:
    root = tmp_path / "pairs"
    for name, (width, height) in {"a": (1, 1), "b": (2, 3), "c": (SIDE, SIDE)}.items():
        for role, shift in (("clean", 0), ("degraded", 30)):
            (root / role).mkdir(parents=True, exist_ok=True)
            pixels = np.clip(photo("astronaut", SIDE)[:height, :width].astype(int) + shift, 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / role / f"{name}.png")
    report = evaluate_dataset(root, workers=1)
    assert report.summary["samples"] == 1 and all(
        np.isfinite(v) for v in report.samples()[0].values() if isinstance(v, float)
    )
    reasons = {Path(problem.path).name: problem.reason for problem in report.problems}
    assert set(reasons) == {"a.png", "b.png"} and "too small: 1x1" in reasons["a.png"]
    assert "too small: 2x3" in reasons["b.png"]


def mode_images() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """Images in many Pillow modes (32x32), each with the RGB pixels every reader must decode it to."""
    gray = photo("camera", 32)[..., 0]
    rgb = photo("astronaut", 32)
    alpha = np.where(np.arange(32)[None, :] < 16, 0, 255).astype(np.uint8).repeat(32, axis=0)
    white_left = rgb.copy()
    white_left[:, :16] = 255
    palette = Image.fromarray(rgb).quantize(16)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    gray3 = np.repeat(gray[..., None], 3, axis=2)
    return {
        "L.png": (Image.fromarray(gray), gray3),
        "I16.png": (Image.fromarray(gray.astype(np.uint16) * 257), gray3),
        "F.tif": (Image.fromarray(gray.astype(np.float32) / 255), gray3),
        "P.png": (palette, np.asarray(palette.convert("RGB"))),
        "CMYK.tif": (cmyk, np.asarray(cmyk.convert("RGB"))),
        "RGBA.png": (Image.fromarray(np.dstack([rgb, alpha])), white_left),
        "RGB.png": (Image.fromarray(rgb), rgb),
    }


@pytest.mark.parametrize("name", list(mode_images()))
def test_every_reader_decodes_every_mode_the_same_way(tmp_path: Path, name: str) -> None:
    image, expected = mode_images()[name]
    image.save(tmp_path / name)
    ref = ImageRef(tmp_path / name)
    decoded = {
        "stored_images": np.asarray(ref.read_rgb()),
        "evaluate": read_rgb(ref),
        "train": np.asarray(_open_rgb(ref, "set")),
        "generate": load_image(tmp_path / name, 32, "native").pixels,
    }
    for reader, pixels in decoded.items():
        np.testing.assert_array_equal(pixels, expected, err_msg=f"{reader} {name}")


def test_a_sixteen_bit_png_measures_like_its_eight_bit_twin(tmp_path: Path) -> None:
    gray = photo("camera", 32)[..., 0]
    for folder, pixels in (("clean", gray), ("degraded", gray.astype(np.uint16) * 257)):
        (tmp_path / "pair" / folder).mkdir(parents=True)
        Image.fromarray(pixels).save(tmp_path / "pair" / folder / "a.png")
    (row,) = evaluate_dataset(tmp_path / "pair", workers=1).samples()
    assert row["psnr"] == float("inf") and row["haze"] == 0 and row["noise"] == 0


# ------------------------------------------------------------------ fuzz

HOSTILE_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    1.5,
    10**30,
    10**400,
    "",
    ".",
    "..",
    "../x",
    "/etc/passwd",
    "a\0b",
    "x" * 300,
    "[bold]",
    "rain.lmdb/../../../x/PWNED",
    [],
    [1],
    [1, 2, 3],
    ["24", "24"],
    {},
    {"rain": "lots"},
    {"rain": 10**400},
]


def _mutate_record(line: bytes, rng: random.Random) -> bytes:
    try:
        record = json.loads(line)
    except ValueError:
        return line
    action = rng.random()
    if action < 0.6 and isinstance(record, dict) and record:
        record[rng.choice(sorted(record))] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
    elif action < 0.75 and isinstance(record, dict) and record:
        del record[rng.choice(sorted(record))]
    elif action < 0.85:
        return line[: rng.randrange(len(line) + 1)]
    elif action < 0.9:
        return b"[" * 100_000 + b"\n"
    else:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))) + b"\n"
    return json.dumps(record).encode() + b"\n"


def _mutate_run_json(root: Path, rng: random.Random) -> None:
    path = root / "run.json"
    info = json.loads(path.read_text())
    action = rng.random()
    variant = info["recipe"]["variants"][0]
    if action < 0.3:
        variant["name"] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
    elif action < 0.5:
        variant["repeats"] = rng.choice([10**9, 10**30, -1, 0, "2", None, 1.5])
    elif action < 0.6:
        info["recipe"] = copy.deepcopy(rng.choice(HOSTILE_VALUES))
    elif action < 0.7:
        path.write_text("[" * 100_000)
        return
    elif action < 0.8:
        path.write_bytes(path.read_bytes()[: rng.randrange(path.stat().st_size)])
        return
    else:
        _replace_with_hostile_file(path, rng)
        return
    path.write_text(json.dumps(info))


def _replace_with_hostile_file(path: Path, rng: random.Random) -> None:
    """Something unreadable at a file's name: a pipe (never waited on), a folder, a link loop or to /dev/zero."""
    path.unlink()
    kind = rng.choice(["fifo", "folder", "loop", "device"])
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "loop":
        path.symlink_to(path.name)
    else:
        path.symlink_to("/dev/zero")


def _mutate_image(path: Path, rng: random.Random) -> None:
    action = rng.random()
    if action < 0.2:
        path.write_bytes(path.read_bytes()[: rng.randrange(path.stat().st_size)])
    elif action < 0.35:
        path.write_bytes(png_header(30000, 30000))
    elif action < 0.5:
        Image.fromarray(np.zeros((rng.randint(1, 3), rng.randint(1, 3)), np.uint8)).save(path, "PNG")
    elif action < 0.6:
        Image.fromarray(photo("coffee")[..., 0].astype(np.uint16) * 257).save(path, "PNG")
    elif action < 0.7:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))))
    elif action < 0.8:
        path.unlink()
    else:
        _replace_with_hostile_file(path, rng)


def _mutate_tar(path: Path, rng: random.Random) -> None:
    action = rng.random()
    if action < 0.6:
        rewrite_tar(path, rng.choice(["missing", "link", "truncated", "empty"]))
    elif action < 0.8:
        content = bytearray(path.read_bytes())
        for _ in range(rng.randint(1, 20)):
            content[rng.randrange(len(content))] = rng.randrange(256)
        path.write_bytes(bytes(content))
    else:
        _replace_with_hostile_file(path, rng)


def mutate(root: Path, rng: random.Random) -> None:
    """One to three mutations; each file is mutated at most once (a mutated one may be a pipe or a damaged tar)."""
    touched: set[Path] = set()
    for _ in range(rng.randint(1, 3)):
        target = rng.random()
        tar = root / "tars/shard-000000.tar"
        if target < 0.45:
            lines = (root / MANIFEST).read_bytes().splitlines(keepends=True)
            at = rng.randrange(len(lines))
            lines[at] = _mutate_record(lines[at], rng)
            (root / MANIFEST).write_bytes(b"".join(lines))
        elif target < 0.6 and root / "run.json" not in touched:
            touched.add(root / "run.json")
            _mutate_run_json(root, rng)
        elif tar.exists() and tar not in touched:
            touched.add(tar)
            _mutate_tar(tar, rng)
        elif images := sorted(set(root.rglob("*.png")) - touched):
            image = rng.choice(images)
            touched.add(image)
            _mutate_image(image, rng)


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Hang("a reader hung (a pipe or device waited on?)")


def test_fuzzed_datasets_never_crash_or_hang_a_reader(tmp_path: Path) -> None:
    """Mutated manifests, run.json, images and tars: verify and preview (commands) and evaluate and train's
    source (library) end normally or with a clean error; none hangs or needs more than 300 MB."""
    bases = {layout: build_dataset(tmp_path / f"base-{layout}", layout) for layout in ("folders", "webdataset")}
    rng = random.Random(17)
    outcomes: dict[str, int] = {}
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for number in range(100):
            root = tmp_path / f"fuzz{number:03d}"
            shutil.copytree(bases[rng.choice(sorted(bases))], root, symlinks=True)
            mutate(root, rng)
            signal.alarm(30)
            for name, args in (
                ("verify", ("verify", "--dataset", root, "--workers", "1")),
                ("preview", ("preview", "--dataset", root, "--out", tmp_path / "p.png", "--cell", "32")),
            ):
                result = mdsd3(*args)
                assert result.exception is None or isinstance(result.exception, SystemExit), (
                    number,
                    name,
                    repr(result.exception),
                    result.output,
                )
                assert result.exit_code in (0, 1, 2) and "Traceback" not in result.output, (number, result.output)
                outcomes[f"{name} {result.exit_code}"] = outcomes.get(f"{name} {result.exit_code}", 0) + 1
            try:
                evaluate_dataset(root, workers=1)
                outcomes["evaluate ok"] = outcomes.get("evaluate ok", 0) + 1
            except (EvaluateError, OSError, ValueError) as error:  # what the command prints as one clean line
                assert str(error), number
            pairs, _ = train_pairs(root)
            for pair in pairs:
                try:
                    _open_rgb(pair.degraded, "set")
                except _PairSkipped:
                    outcomes["train skip"] = outcomes.get("train skip", 0) + 1
            signal.alarm(0)
            shutil.rmtree(root)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mb < 300, grown_mb
    assert outcomes.get("verify 1", 0) > 20 and outcomes.get("preview 0", 0) > 20, outcomes


# ------------------------------------------------------------------ size caps (issue 27, item 4)


def _size_problems(root: Path) -> dict[str, str]:
    """What verify, evaluate and preview say about the images they did not read, by reader."""
    said = {"verify": " ".join(f"{p.where}: {p.detail}" for p in verify_dataset(root, workers=1).problems)}
    try:
        said["evaluate"] = " ".join(f"{p.path}: {p.reason}" for p in evaluate_dataset(root, workers=1).problems)
    except EvaluateError as error:  # every pair unreadable
        said["evaluate"] = str(error)
    problems: list[str] = []
    contact_sheet(root, problems=problems)
    said["preview"] = " ".join(problems)
    return said


@pytest.mark.parametrize("layout", ["folders", "webdataset"])
def test_an_image_larger_than_its_record_is_refused_before_it_is_read(tmp_path: Path, layout: str) -> None:
    import tracemalloc

    from mdsd3_cli.export.run import ExportError, run_export

    root = build_dataset(tmp_path / "set", layout)
    written = records(root)
    if layout == "folders":  # a sparse 64 MiB file (a few KiB on disk), a valid PNG with trailing zeros
        clean = root / written[0]["clean"]
        recorded = clean.stat().st_size
        os.truncate(clean, 64 << 20)
        where, size = written[0]["clean"], 64 << 20
    else:  # the member is one byte longer than its records say
        recorded = written[0]["clean_bytes"] - 1
        for record in written[:2]:  # the key's two records share its clean member
            record["clean_bytes"] = recorded
        write_records(root, written)
        where, size = f"tars/shard-000000.tar:{written[0]['clean_member']}", recorded + 1
    tracemalloc.start()
    try:
        said = _size_problems(root)
        with pytest.raises(ExportError, match=f"{size} bytes, the manifest's clean_bytes is {recorded}"):
            run_export(root, "parquet", tmp_path / "parquet")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak / 2**20:.0f} MiB: the image was read"
    for reader, text in said.items():
        assert where in text and re.search(
            f"{size} bytes, (manifest says|the manifest's clean_bytes is) {recorded}", text
        ), (reader, text)
    assert not (tmp_path / "parquet").exists()


def test_an_image_over_the_cap_without_a_recorded_size_is_refused_unread(tmp_path: Path, monkeypatch) -> None:
    from mdsd3_cli.dataset import stored_images

    monkeypatch.setattr(stored_images, "MAX_IMAGE_BYTES", 1 << 20)  # a small cap: the file stays small
    root = build_dataset(tmp_path / "set")
    written = records(root)
    for record in written:  # an older manifest: no recorded sizes
        del record["clean_bytes"], record["degraded_bytes"]
    write_records(root, written)
    os.truncate(root / written[0]["clean"], 4 << 20)
    said = _size_problems(root)
    for reader, text in said.items():
        assert written[0]["clean"] in text, (reader, text)
        assert f"{4 << 20} bytes, more than the largest image file read ({1 << 20})" in text, (reader, text)
    assert ImageRef(root / written[1]["degraded"]).read_rgb().size == (SIDE, SIDE)


def test_verify_does_not_read_a_records_member_over_its_line_limit(tmp_path: Path, monkeypatch) -> None:
    from mdsd3_cli.dataset import verify

    root = build_dataset(tmp_path / "set", "webdataset")
    monkeypatch.setattr(verify, "MAX_LINE_BYTES", 64)  # a small limit: every .json member (one record) is over it
    found = {(p.kind, p.where, p.detail) for p in verify_dataset(root, workers=1).problems}
    for record in records(root):
        where = f"tars/shard-000000.tar:{record['json_member']}"
        assert any(
            kind == "size" and at == where and detail.endswith(" bytes for 1 record(s); not read")
            for kind, at, detail in found
        ), found
