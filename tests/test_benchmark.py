"""scripts/benchmark.py on the tiny preset: it runs, and stdout is JSON lines with the documented keys (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
COMMON = {"measure", "variant", "preset", "device", "gpu", "dtype", "size", "images", "transformer_batch"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def _parse_in_process(capsys, monkeypatch, *args: str) -> subprocess.CompletedProcess:
    """The script's argument parsing in this process (no interpreter start-up), at a child's 80 columns."""
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exited:
        module.main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, exited.value.code, out, err)


def test_benchmark_tiny_prints_json_lines():
    result = _run(
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--size",
        "32",
        "--batch",
        "1",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--steps",
        "1",
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    setup, rows = lines[0], lines[1:]
    assert setup["measure"] == "setup" and setup["preset"] == "tiny" and setup["device"] == "cpu"
    assert setup["dtype"] == "fp32" and setup["gpu"] is None
    for row in rows:
        assert COMMON <= set(row), row
        assert (row["preset"], row["size"], row["images"], row["transformer_batch"]) == ("tiny", 32, 1, 2)
    assert not [row for row in rows if row["measure"] == "skipped"]

    steps = {row["variant"]: row for row in rows if row["measure"] == "step_ms"}
    assert set(steps) == {"stock", "cached", "recomputed"}
    for row in steps.values():
        assert row["ms"] > 0 and row["ratio_to_stock"] > 0 and row["finite"] is True
    assert steps["stock"]["ratio_to_stock"] == 1.0

    (cache,) = [row for row in rows if row["measure"] == "cache_build_ms"]
    assert cache["ms"] > 0 and cache["cache_gib"] > 0
    assert cache["cache_shape"][:3] == [2, 3, 1]  # blocks x (Δq, Δk, Δv) x images

    (sampler,) = [row for row in rows if row["measure"] == "sampler_images_per_s"]
    assert sampler["images_per_s"] > 0 and sampler["steps"] == 1 and sampler["guidance"] == 7.0

    peaks = {row["variant"]: row for row in rows if row["measure"] == "peak_memory_gib"}
    assert set(peaks) == {"cache_build", "stock", "cached", "recomputed", "sampler"}
    assert all(row["gib"] > 0 and row["memory_kind"] for row in peaks.values())
    assert "stock" in result.stderr  # the human table goes to stderr


def test_benchmark_help_and_bad_size(capsys, monkeypatch):
    result = _parse_in_process(capsys, monkeypatch, "--help")
    assert result.returncode == 0
    for word in (
        "step_ms",
        "cache_build_ms",
        "sampler_images_per_s",
        "peak_memory_gib",
        "sd3-medium",
        "--skip-sampler",
    ):
        assert word in result.stdout
    bad = _parse_in_process(capsys, monkeypatch, "--preset", "tiny", "--device", "cpu", "--size", "33")
    assert bad.returncode == 2 and "multiples of 16" in bad.stderr
