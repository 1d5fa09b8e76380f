"""Fingerprint what mdsd3 writes, so a refactor can show its outputs are byte-identical.

Runs on the tiny preset (CPU, seconds): `mdsd3 generate` in both output layouts, a `Synthesizer.degrade`
call on tiny and on mini, and `mdsd3 calibrate` against a reference made by scripts/make_reference.py. Prints one JSON object:
every output file's SHA-256 by its path relative to the work folder, and the Synthesizer's arrays' SHA-256.
Wall-clock figures (keys named like `timings`, `elapsed_s`) are dropped from JSON files, manifest lines
are sorted (they are appended as samples finish) and the work folder's path is written `<work>` before hashing; everything else is hashed byte for byte.

    python scripts/output_fingerprint.py > before.json      # on the old commit
    python scripts/output_fingerprint.py > after.json       # on the new one
    diff before.json after.json                             # nothing: byte-identical
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO / "examples" / "photos"
WALL_CLOCK_KEYS = {"timings", "timings_s", "elapsed_s", "seconds", "wall_s"}


def _without_wall_clock(value: object) -> object:
    if isinstance(value, dict):
        return {key: _without_wall_clock(item) for key, item in value.items() if key not in WALL_CLOCK_KEYS}
    if isinstance(value, list):
        return [_without_wall_clock(item) for item in value]
    return value


def _file_digest(root: Path, path: Path) -> str:
    data = path.read_bytes().replace(str(root).encode(), b"<work>")
    if path.suffix == ".json":
        data = json.dumps(_without_wall_clock(json.loads(data))).encode()  # key order kept
    elif path.suffix == ".jsonl":  # lines are appended as samples finish: their order is not part of the format
        data = b"\n".join(sorted(data.splitlines()))
    return hashlib.sha256(data).hexdigest()


def _folder_digests(root: Path, folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): _file_digest(root, path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.endswith(".lock")
    }


def _write_recipe(work: Path, layout: str) -> Path:
    photos = work / "photos"
    if not photos.exists():
        photos.mkdir(parents=True)
        for name in ("rocket.jpg", "astronaut.jpg", "chelsea.jpg"):
            shutil.copy(PHOTOS / name, photos / name)
    recipe = {
        "model": {"base": "tiny", "classes": ["rain", "haze", "noise"]},
        "input": {"paths": ["photos"], "size": 48, "resize": "center_crop"},
        "output": {"dir": f"out_{layout}", "format": "png", "layout": layout},
        "sampling": {
            "steps": 3,
            "guidance": 2.0,
            "alpha": 0.6,
            "beta": 0.8,
            "seed": 5,
            "batch_size": 2,
            "grid_shifts": 2,
        },
        "variants": [
            {"name": "identity", "classes": {}},
            {"name": "rain", "classes": {"rain": 1.0}, "repeats": 2},
            {"name": "mix", "classes": {"haze": [0.2, 0.9], "noise": 0.5}},
        ],
    }
    path = work / f"recipe_{layout}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _mdsd3(*arguments: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mdsd3_cli", *arguments], cwd=cwd, capture_output=True, text=True)
    if result.returncode not in (0, 1):
        raise SystemExit(f"mdsd3 {' '.join(arguments)} exited {result.returncode}:\n{result.stderr}")


def _synthesizer_digests(work: Path) -> dict[str, str]:
    from mdsd3_cli import Synthesizer

    photos = [str(work / "photos" / "rocket.jpg"), str(work / "photos" / "chelsea.jpg")]
    digests = {}
    for preset in ("tiny", "mini"):  # mini: the residual x-prediction and output convolution paths
        synth = Synthesizer.from_preset(preset, overrides=["input.size=48"])
        pairs = synth.degrade(photos, classes={"rain": 0.7, "haze": 0.2}, seed=11)
        digests |= {
            f"synthesizer/{preset}/{index}/{part}": hashlib.sha256(getattr(pair, part).tobytes()).hexdigest()
            for index, pair in enumerate(pairs)
            for part in ("clean", "degraded")
        }
    return digests


def _make_reference(folder: Path) -> Path:
    spec = importlib.util.spec_from_file_location("make_reference", REPO / "scripts" / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_reference(folder)


def fingerprint(work: Path) -> dict[str, str]:
    """Every digest, by name."""
    digests: dict[str, str] = {}
    for layout in ("folders", "webdataset"):
        _mdsd3("generate", "--config", str(_write_recipe(work, layout)), cwd=work)
        digests |= _folder_digests(work, work / f"out_{layout}")
    digests |= _synthesizer_digests(work)
    reference = _make_reference(work / "reference")
    _mdsd3(
        "calibrate",
        "--config",
        str(work / "recipe_folders.yaml"),
        "--reference",
        str(reference),
        "--out",
        str(work / "calibrated" / "recipe.yaml"),
        "--probe",
        "1",
        "--grid",
        "3",
        "--check",
        "2",
        "--workers",
        "1",
        cwd=work,
    )
    digests |= _folder_digests(work, work / "calibrated")
    return digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    arguments = parser.parse_args()
    if arguments.keep:
        arguments.keep.mkdir(parents=True, exist_ok=False)
        print(json.dumps(fingerprint(arguments.keep), indent=1, sort_keys=True))
        return
    with tempfile.TemporaryDirectory() as folder:
        print(json.dumps(fingerprint(Path(folder)), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
