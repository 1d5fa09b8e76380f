"""The README's timing claims: each paragraph that gives a duration names the machine it was measured on, and
the README says that a shared CPU slows the runs."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
DURATION = re.compile(r"\b\d+(?:\.\d+)? ?(?:s|min|minutes|hours?)\b")
MACHINE = re.compile(r"AMD EPYC|Intel Xeon|NVIDIA|GPU")


def test_every_timing_names_its_machine_and_a_shared_cpu_is_mentioned():
    text = README.read_text(encoding="utf-8")
    paragraphs = [paragraph for paragraph in re.split(r"\n\s*\n", text) if not paragraph.startswith("```")]
    timed = [paragraph for paragraph in paragraphs if DURATION.search(paragraph)]
    assert timed  # the README does give figures
    for paragraph in timed:
        assert MACHINE.search(paragraph), paragraph
    assert re.search(r"shared CPU[^.]*slows", text.replace("\n", " "))
