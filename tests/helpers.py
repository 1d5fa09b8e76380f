"""What the tests share: the CLI runner, one recipe builder (`a.b=c` overrides, as users type them), photos and
the small readers of a dataset's files. Test modules import this; they never import each other."""

from __future__ import annotations

import copy
import math
import shutil
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from click.testing import Result
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from mdsd3_cli.cli import app
from mdsd3_cli.dataset.stored_images import ImageRef
from mdsd3_cli.generate.plan import ShardSpec
from mdsd3_cli.generate.run import plan_run, run_generate
from mdsd3_cli.recipe.generate import load_recipe
from mdsd3_cli.recipe.overrides import apply_override

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PHOTOS = REPO / "examples" / "photos"
CLASSES = ["rain", "haze", "noise"]
PHOTOS = {"astronaut": "astronaut.png", "coffee": "coffee.png", "chelsea": "sub/chelsea.v2 x.png"}
"""skimage image -> file under the input folder (a sub folder, a dot and a space exercise the key rules)."""
FOLDERS = ["rain", "mix_r1", "mix_r2"]
"""The degraded folders TINY_RECIPE writes."""

TINY_RECIPE: dict[str, Any] = {
    "model": {"base": "tiny", "classes": CLASSES},
    "input": {"paths": ["photos"], "size": 32},
    "output": {"dir": "out"},
    "sampling": {"steps": 2, "guidance": 2.0, "seed": 3, "batch_size": 4},
    "variants": [
        {"name": "rain", "classes": {"rain": 1.0}},
        {"name": "mix", "classes": {"haze": [0.2, 0.8], "noise": 0.5}, "repeats": 2},
    ],
}
"""The tiny preset at 32 px, 2 steps: 3 samples per input in FOLDERS."""


# ---------------------------------------------------------------------------------------------- the CLI


def mdsd3(*args: object, check: bool = False, env: dict[str, str] | None = None) -> Result:
    """`mdsd3 *args` in this process (typer's CliRunner: same commands, no interpreter start-up), with `env` added
    to the environment; `check` raises on a non-zero exit. Tests about processes (kills, signals, concurrent
    shards) start one themselves."""
    result = CliRunner().invoke(app, [str(arg) for arg in args], env=env)
    if check and result.exit_code != 0:
        raise AssertionError(f"mdsd3 {args} failed ({result.exit_code}):\n{result.output}\n{result.exception!r}")
    return result


def assert_clean_error(result: Result, *fragments: str) -> str:
    """Exit status 2, no traceback, and every fragment verbatim in the error output; returns that output."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)
    return result.stderr


# ---------------------------------------------------------------------------------------------- recipes


def yaml_text(value: object) -> str:
    """`value` written as one line of YAML, for an override (`f"input.paths=[{yaml_text(path)}]"`)."""
    text = yaml.safe_dump(
        str(value) if isinstance(value, Path) else value, default_flow_style=True, sort_keys=False, width=math.inf
    )
    return text.removesuffix("...\n").strip()


def recipe_data(*overrides: str, base: dict[str, Any] = TINY_RECIPE) -> dict[str, Any]:
    """A copy of `base` with each `dotted.field=value` override applied as `--set` applies it."""
    recipe = copy.deepcopy(base)
    for override in overrides:
        apply_override(recipe, override)
    return recipe


def write_recipe(path: Path, *overrides: str, base: dict[str, Any] = TINY_RECIPE) -> Path:
    """`recipe_data(*overrides, base=base)` written to `path` as YAML."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe_data(*overrides, base=base), sort_keys=False))
    return path


def generate_recipe(path: Path, inputs: Path, out: Path, *overrides: str, base: dict[str, Any] = TINY_RECIPE) -> Path:
    """A generate recipe reading the photos in `inputs` and writing to `out` (then `overrides`)."""
    paths, folder = f"input.paths=[{yaml_text(inputs)}]", f"output.dir={yaml_text(out)}"
    return write_recipe(path, paths, folder, *overrides, base=base)


def generate(recipe_path: Path, shard: ShardSpec = ShardSpec(0, 1)) -> None:
    """Run a generate recipe in process; it must finish."""
    summary = run_generate(plan_run(load_recipe(recipe_path), shard))
    assert summary.exit_code == 0, summary


# ---------------------------------------------------------------------------------------------- files


def write_photos(folder: Path, files: dict[str, str] = PHOTOS) -> Path:
    """skimage's photos saved as PNG: image name -> file under `folder`."""
    for name, relative in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(data, name)()).save(path)
    return folder


def photo_files(*names: str) -> dict[str, str]:
    """`name.png` for each skimage image name, for write_photos."""
    return {name: f"{name}.png" for name in names}


def copy_dataset(dataset: Path, destination: Path) -> Path:
    shutil.copytree(dataset, destination)
    return destination


def dataset_files(out: Path) -> dict[str, bytes]:
    """Every image under clean/ and degraded/, by relative path."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*.png"))
        if p.relative_to(out).parts[0] in ("clean", "degraded")
    }


def manifest_lines(out: Path) -> list[str]:
    return [line for path in sorted((out / "manifest").glob("*.jsonl")) for line in path.read_text().splitlines()]


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is a few bytes (bomb / truncation probe)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 16))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def count_decodes(monkeypatch: Any) -> Counter[Path]:
    """A counter of image decodes per file (`ImageRef.read_rgb` calls in this process), live until the test ends."""
    decodes: Counter[Path] = Counter()
    read_rgb = ImageRef.read_rgb

    def counted(self: ImageRef) -> Image.Image:
        decodes[self.path] += 1
        return read_rgb(self)

    monkeypatch.setattr(ImageRef, "read_rgb", counted)
    return decodes
