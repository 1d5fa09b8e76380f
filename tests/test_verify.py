"""`mdsd3 verify` and the manifest's SHA-256 fields, on a tiny folders dataset and damaged copies of it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mdsd3_cli.dataset.verify import verify_dataset

from .helpers import FOLDERS, copy_dataset, mdsd3


def records(dataset: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted((dataset / "manifest").glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def kinds(dataset: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for problem in verify_dataset(dataset, workers=2).problems:
        found.setdefault(problem.kind, []).append(problem.where)
    return found


def test_manifest_records_every_files_sha256_and_size(folders_dataset):
    written = records(folders_dataset)
    assert sorted({r["folder"] for r in written}) == sorted(FOLDERS) and len(written) == 9
    for record in written:
        for role in ("clean", "degraded"):
            data = (folders_dataset / record[role]).read_bytes()
            assert record[f"{role}_sha256"] == hashlib.sha256(data).hexdigest()
            assert record[f"{role}_bytes"] == len(data)


def test_a_finished_dataset_verifies(folders_dataset):
    report = verify_dataset(folders_dataset, workers=2)
    assert report.ok, report.problems
    assert (report.records, report.files) == (9, 3 + 9)
    assert report.bytes == sum(p.stat().st_size for p in folders_dataset.rglob("*.png"))


def test_verify_finds_each_kind_of_damage(folders_dataset, tmp_path):
    dataset = copy_dataset(folders_dataset, tmp_path / "damaged")
    written = records(dataset)
    deleted, flipped, truncated = (written[0]["degraded"], written[1]["degraded"], written[2]["degraded"])
    (dataset / deleted).unlink()
    data = bytearray((dataset / flipped).read_bytes())
    data[len(data) // 2] ^= 0x01
    (dataset / flipped).write_bytes(bytes(data))
    (dataset / truncated).write_bytes((dataset / truncated).read_bytes()[:-40])
    manifest = sorted((dataset / "manifest").glob("*.jsonl"))[0]
    lines = manifest.read_text().splitlines(keepends=True)
    dropped = json.loads(lines[3])
    manifest.write_text("".join(lines[:3] + lines[4:]))
    (dataset / "degraded" / "rain" / "stray.png").write_bytes(b"not a record")

    found = kinds(dataset)
    assert found["missing"] == [deleted]
    assert flipped in found["hash"] and truncated in found["hash"]
    assert truncated in found["size"] and truncated in found["decode"]
    assert flipped not in found["size"]  # same length, other bytes: only the hash tells
    assert sorted(found["orphan"]) == sorted([dropped["degraded"], "degraded/rain/stray.png"])
    assert found["incomplete"] == [dropped["key"]]

    result = mdsd3("verify", "--dataset", str(dataset))
    assert result.exit_code == 1
    assert deleted in result.output and "orphan" in result.output


def test_verify_exit_status(folders_dataset, tmp_path):
    assert mdsd3("verify", "--dataset", str(folders_dataset)).exit_code == 0
    result = mdsd3("verify", "--dataset", str(tmp_path))
    assert result.exit_code == 2 and "no manifest" in result.output


def test_unfinished_and_corrupt_manifest_lines_are_problems(folders_dataset, tmp_path):
    dataset = copy_dataset(folders_dataset, tmp_path / "lines")
    manifest = sorted((dataset / "manifest").glob("*.jsonl"))[0]
    text = manifest.read_text()
    manifest.write_text(text + "{not json}\n" + '{"key": "half')
    assert [problem.detail.split(":")[0] for problem in verify_dataset(dataset).problems] == [
        "not JSON",
        "unfinished last line (a killed run; rerun generate)",
    ]


@pytest.mark.parametrize("field", ["clean", "degraded"])
def test_records_cannot_point_outside_the_dataset(folders_dataset, tmp_path, field):
    dataset = copy_dataset(folders_dataset, tmp_path / "escape")
    manifest = sorted((dataset / "manifest").glob("*.jsonl"))[0]
    lines = manifest.read_text().splitlines(keepends=True)
    record = json.loads(lines[0])
    record[field] = "../outside.png"
    manifest.write_text("".join([json.dumps(record) + "\n", *lines[1:]]))
    problems = verify_dataset(dataset).problems
    assert any(p.kind == "manifest" and "outside the dataset" in p.detail for p in problems)
