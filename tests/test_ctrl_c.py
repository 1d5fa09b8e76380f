"""Ctrl-C during `mdsd3 generate` (a real process on the tiny preset): the first says at once that the run stops
after this batch; a second stops it at once with exit status 130 and a message, never a traceback."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from .helpers import generate_recipe

STOPPING = "SIGINT: stopping after this batch… (Ctrl-C again to stop at once)"


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def test_first_ctrl_c_says_it_stops_after_the_batch_and_a_second_exits_130(tiny_photos, tmp_path: Path):
    out = tmp_path / "out"
    recipe = generate_recipe(tmp_path / "r.yaml", tiny_photos, out)
    data = yaml.safe_load(recipe.read_text())
    data["sampling"].update(steps=8, batch_size=1)  # batches long enough for the second Ctrl-C to land in one
    recipe.write_text(yaml.safe_dump(data))
    process = subprocess.Popen(
        [sys.executable, "-m", "mdsd3_cli", "generate", "--config", str(recipe)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(process.stderr, lines), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while (
            time.monotonic() < deadline
            and process.poll() is None
            and not any(path.read_text().strip() for path in out.glob("manifest/*.jsonl"))
        ):
            time.sleep(0.02)  # the first sample is written: the run is sampling
        process.send_signal(signal.SIGINT)
        seen = []
        while STOPPING not in "".join(seen):
            line = lines.get(timeout=60)
            assert line is not None, "".join(seen)
            seen.append(line)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=300)
    finally:
        process.kill()
    while (line := lines.get(timeout=60)) is not None:
        seen.append(line)
    stderr = "".join(seen)
    assert process.returncode == 130, stderr
    assert "stopped at once" in stderr and "rerun the same command to finish" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
