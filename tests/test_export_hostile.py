"""`mdsd3 export` against hostile datasets and concurrent runs (issue 17, export part): it deletes only its own
staging folder, one export writes a destination, unfinished runs need --partial, names from the dataset never
become paths outside the destination, bad records and images give one clear error."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from mdsd3_cli.dataset.ownership import shard_lock
from mdsd3_cli.dataset.tar_format import flat_key
from mdsd3_cli.export import webdataset as webdataset_format
from mdsd3_cli.export.parquet import PARTIAL_METADATA_KEY
from mdsd3_cli.export.run import ExportError, run_export
from mdsd3_cli.export.staging import (
    PARTIAL_FILE,
    DestinationBusyError,
    DestinationExistsError,
    lock_path,
    rename_no_replace,
)
from mdsd3_cli.util.safe_names import safe_component

from .helpers import FOLDERS, copy_dataset, mdsd3

PAIRS = 9  # 3 keys x 3 variant folders in the tiny dataset


def export_cli(*arguments: str) -> Any:
    return mdsd3("export", *arguments)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def rewrite_records(dataset: Path, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
    """Apply `change` to every manifest record (None drops the record)."""
    for manifest in sorted((dataset / "manifest").glob("*.jsonl")):
        records = [change(json.loads(line)) for line in manifest.read_text().splitlines()]
        manifest.write_text("".join(json.dumps(record) + "\n" for record in records if record is not None))


def replace_image(dataset: Path, record: dict[str, Any], image: Image.Image) -> None:
    """Write `image` over the record's degraded file and make its SHA-256 and byte count match."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    (dataset / record["degraded"]).write_bytes(data)
    record.update(degraded_sha256=hashlib.sha256(data).hexdigest(), degraded_bytes=len(data))


def first_degraded(dataset: Path, action: Callable[[dict[str, Any]], None]) -> None:
    """Run `action` on the first rain record (in place)."""
    done = []

    def change(record: dict[str, Any]) -> dict[str, Any]:
        if not done and record["folder"] == "rain":
            action(record)
            done.append(record)
        return record

    rewrite_records(dataset, change)
    assert done


# 1. the staging folder is this process's own


def test_export_never_deletes_a_partial_folder_it_did_not_create(folders_dataset, tmp_path):
    victim = copy_dataset(folders_dataset, tmp_path / ".victim.partial")
    before = tree(victim)
    result = export_cli("--dataset", str(victim), "--to", "parquet", str(tmp_path / "victim"))
    assert result.exit_code == 0, result.output
    assert tree(victim) == before  # the source dataset is intact
    assert len(pq.read_table(tmp_path / "victim").column("key")) == PAIRS

    users = tmp_path / ".results.partial"
    users.mkdir()
    (users / "notes.txt").write_text("my results")
    assert export_cli("--dataset", str(folders_dataset), "--to", "lmdb", str(tmp_path / "results")).exit_code == 0
    assert tree(users) == {"notes.txt": b"my results"}
    assert not lock_path(tmp_path / "results").exists()  # the destination's lock goes with the export


# 2. one writer per destination; the final rename never replaces


def test_a_second_export_to_the_same_destination_is_refused_while_the_first_writes(
    folders_dataset, tmp_path, monkeypatch
):
    destination = tmp_path / "out"
    original = webdataset_format.TarWriter.write_key
    second: list[BaseException] = []

    def write_then_race(self, samples):
        original(self, samples)
        if not second:  # the first export is half-way: a second one starts on the same destination
            second.append(AssertionError("the second export was not refused"))
            try:
                run_export(folders_dataset, "webdataset", destination, per_file=2)
            except DestinationBusyError as error:
                second[0] = error

    monkeypatch.setattr(webdataset_format.TarWriter, "write_key", write_then_race)
    run_export(folders_dataset, "webdataset", destination, per_file=2)
    monkeypatch.undo()
    assert isinstance(second[0], DestinationBusyError), second
    assert f"another export is writing {destination}" in str(second[0])
    assert sum(1 for _ in destination.glob("*.tar")) == 2  # the first export's whole result, nobody else's
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # no staging folder, no lock file left


def test_a_destination_that_appears_meanwhile_is_never_replaced(folders_dataset, tmp_path, monkeypatch):
    destination = tmp_path / "out"
    original = webdataset_format.TarWriter.write_key

    def write_then_someone_creates_it(self, samples):
        original(self, samples)
        destination.mkdir(exist_ok=True)  # an empty folder: plain os.rename would silently replace it

    monkeypatch.setattr(webdataset_format.TarWriter, "write_key", write_then_someone_creates_it)
    with pytest.raises(DestinationExistsError, match="appeared while it was being written"):
        run_export(folders_dataset, "webdataset", destination)
    assert list(destination.iterdir()) == []
    kept = [path for path in tmp_path.iterdir() if path.name.endswith(".partial")]
    assert len(kept) == 1 and sum(1 for _ in kept[0].glob("*.tar")) == 1  # the finished result, named in the error


def test_rename_no_replace_refuses_an_existing_empty_folder(tmp_path):
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "file").write_text("x")
    (tmp_path / "target").mkdir()
    with pytest.raises(FileExistsError):
        rename_no_replace(tmp_path / "source", tmp_path / "target")
    assert (tmp_path / "source" / "file").exists() and list((tmp_path / "target").iterdir()) == []
    rename_no_replace(tmp_path / "source", tmp_path / "new")
    assert (tmp_path / "new" / "file").read_text() == "x"


def test_a_foreign_file_at_the_lock_name_is_refused_and_kept(folders_dataset, tmp_path):
    foreign = lock_path(tmp_path / "out")
    foreign.write_text("someone's notes")
    result = export_cli("--dataset", str(folders_dataset), "--to", "lmdb", str(tmp_path / "out"))
    assert result.exit_code == 2 and "mdsd3 did not write" in result.output
    assert foreign.read_text() == "someone's notes" and not (tmp_path / "out").exists()


# 3. an unfinished run needs --partial, and the output says it is partial


def test_export_refuses_a_run_that_a_generate_is_writing(folders_dataset, tmp_path):
    dataset = copy_dataset(folders_dataset, tmp_path / "dataset")
    with shard_lock(dataset, "shard-00000-of-00001"):  # what a live generate holds
        result = export_cli("--dataset", str(dataset), "--to", "parquet", str(tmp_path / "refused"))
        assert result.exit_code == 2 and "a generate is writing it now" in result.output, result.output
        assert "--partial" in result.output and not (tmp_path / "refused").exists()
        result = export_cli("--dataset", str(dataset), "--to", "parquet", "--partial", str(tmp_path / "partial"))
    assert result.exit_code == 0, result.output
    assert "PARTIAL" in result.output
    metadata = pq.read_schema(next((tmp_path / "partial").glob("*.parquet"))).metadata
    note = json.loads(metadata[PARTIAL_METADATA_KEY.encode()])
    assert note["partial"] is True and "a generate is writing it now" in note["why"][0]


@pytest.mark.parametrize("plans", ["recorded", "not recorded (an earlier mdsd3)"])
def test_export_refuses_a_run_whose_shards_did_not_all_run(folders_dataset, tmp_path, plans):
    dataset = copy_dataset(folders_dataset, tmp_path / "dataset")
    for path in (dataset / "manifest").glob("shard-00000-of-00001.*"):
        if path.suffix == ".jsonl" or plans == "recorded":
            renamed = path.with_name(path.name.replace("of-00001", "of-00003"))
            renamed.write_text(path.read_text().replace("shard-00000-of-00001", "shard-00000-of-00003"))
        path.unlink()
    message = "shard-00001-of-00003: never ran" if plans == "recorded" else "shards 1, 2 of 3 never ran"
    with pytest.raises(ExportError, match=message):
        run_export(dataset, "webdataset", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_partial_export_leaves_out_incomplete_keys_and_says_so(folders_dataset, tmp_path):
    dataset = copy_dataset(folders_dataset, tmp_path / "dataset")
    rewrite_records(dataset, lambda record: None if (record["key"], record["folder"]) == ("coffee", "rain") else record)
    with pytest.raises(ExportError, match="unfinished: .*1 of 9 pairs have no record"):
        run_export(dataset, "lmdb", tmp_path / "refused")
    summary = run_export(dataset, "lmdb", tmp_path / "lmdb", partial=True)
    assert summary.pairs == 6 and summary.keys_left_out == 1
    note = json.loads((tmp_path / "lmdb" / PARTIAL_FILE).read_text())
    assert note == {
        "partial": True,
        "dataset": str(dataset.resolve()),
        "pairs": 6,
        "keys_left_out": 1,
        "why": [
            "the manifests list 8 samples, the finished shards planned 9 (records were lost: rerun generate)",
            "1 of 9 pairs have no record (mdsd3 verify lists them)",
        ],
    }
    for database in ["gt", *(f"lq_{folder}" for folder in FOLDERS)]:  # the same key set everywhere (BasicSR)
        lines = (tmp_path / "lmdb" / f"{database}.lmdb" / "meta_info.txt").read_text().splitlines()
        assert sorted(line.split(".")[0] for line in lines) == ["astronaut", "sub/chelsea%2Ev2%20x"]


# 4. names from the dataset that become paths


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "..\\x", "a\0b", "rain.lmdb/../../x"])
def test_safe_component_refuses_anything_but_one_component(name):
    with pytest.raises(ValueError, match="variant folder"):
        safe_component(name, "variant folder")


def test_safe_component_keeps_ordinary_names():
    assert safe_component("-rain_r1 x.v2", "variant folder") == "-rain_r1 x.v2"


def test_a_variant_name_that_is_a_path_writes_nothing_outside(folders_dataset, tmp_path):
    dataset = copy_dataset(folders_dataset, tmp_path / "dataset")
    hostile = "rain.lmdb/../../../outside/PWNED"
    info = json.loads((dataset / "run.json").read_text())
    info["recipe"]["variants"][1]["name"] = hostile
    (dataset / "run.json").write_text(json.dumps(info))
    rewrite_records(dataset, lambda record: {**record, "folder": record["folder"].replace("mix", hostile)})
    (tmp_path / "outside").mkdir()
    (tmp_path / "exports").mkdir()
    result = export_cli("--dataset", str(dataset), "--to", "lmdb", str(tmp_path / "exports" / "out"))
    assert result.exit_code == 2 and "safe file name" in result.output, result.output
    assert list((tmp_path / "outside").iterdir()) == [] and list((tmp_path / "exports").iterdir()) == []


# 5. a bad record: one error naming the manifest file and the field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", None),
        ("size", "32x32"),
        ("size", [32]),
        ("ratios", None),
        ("seed", "3"),
        ("repeat", 2**40),
        ("key", ""),
        ("key", "k" * 600),
    ],
)
@pytest.mark.parametrize("to", ["lmdb", "parquet"])
def test_a_bad_record_names_the_manifest_and_the_field(folders_dataset, tmp_path, field, value, to):
    dataset = copy_dataset(folders_dataset, tmp_path / "dataset")
    first_degraded(dataset, lambda record: record.pop(field) if value is None else record.update({field: value}))
    result = export_cli("--dataset", str(dataset), "--to", to, str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    named = f"key {value!r}" if field == "key" else f"field '{field}'"  # keys are checked by the manifest reader
    assert "shard-00000-of-00001.jsonl:" in result.output and named in result.output
    assert not (tmp_path / "out").exists()


# 6. images are decoded: size against the record and Pillow's pixel limit; meta_info from the decoded image


def test_an_image_of_another_size_is_refused_even_with_a_matching_sha(folders_dataset, tmp_path):
    dataset = copy_dataset(folders_dataset, tmp_path / "dataset")
    first_degraded(dataset, lambda record: replace_image(dataset, record, Image.new("RGB", (16, 16))))
    with pytest.raises(ExportError, match="decodes to 16x16, the manifest's size is 32x32"):
        run_export(dataset, "lmdb", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_of_another_byte_count_than_recorded_is_refused(folders_dataset, tmp_path):
    """LMDB maps are sized from the recorded byte counts: a record that understates them is refused."""
    dataset = copy_dataset(folders_dataset, tmp_path / "dataset")
    first_degraded(dataset, lambda record: record.update(degraded_bytes=1))
    with pytest.raises(ExportError, match="the manifest's degraded_bytes is 1"):
        run_export(dataset, "lmdb", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_over_the_pixel_limit_is_refused(folders_dataset, tmp_path, monkeypatch):
    dataset = copy_dataset(folders_dataset, tmp_path / "dataset")

    first_degraded(dataset, lambda record: replace_image(dataset, record, Image.new("RGB", (64, 64))))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 64x64 = 4096 pixels: over the limit, under twice it
    with pytest.raises(ExportError, match="more than Pillow's MAX_IMAGE_PIXELS"):
        run_export(dataset, "parquet", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_meta_info_carries_the_decoded_shape(folders_dataset, tmp_path):
    dataset = copy_dataset(folders_dataset, tmp_path / "dataset")
    chosen: list[dict[str, Any]] = []

    def grey(record: dict[str, Any]) -> None:
        replace_image(dataset, record, Image.new("L", (32, 32), 128))
        chosen.append(record)

    first_degraded(dataset, grey)
    run_export(dataset, "lmdb", tmp_path / "out")
    lines = (tmp_path / "out" / "lq_rain.lmdb" / "meta_info.txt").read_text().splitlines()
    key = flat_key(chosen[0]["key"])
    assert f"{key}.png (32,32,1) 1" in lines
    assert sum(line.endswith("(32,32,3) 1") for line in lines) == len(lines) - 1
    assert os.path.isdir(tmp_path / "out" / "gt.lmdb")


def test_the_destination_lock_holds_across_processes_and_survives_kill_9(folders_dataset, tmp_path):
    """Another process holding DEST's lock refuses this export; once it is killed (-9), the next export takes the
    stale lock file over and removes it."""
    destination = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; "
            "from mdsd3_cli.util.output_lock import OutputLock; "
            f"lock = OutputLock(Path({str(destination)!r}), 'export'); print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        result = export_cli("--dataset", str(folders_dataset), "--to", "parquet", str(destination))
        assert result.exit_code == 2 and f"(PID {holder.pid})" in result.output, result.output
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(destination).exists()  # what a kill -9 leaves
    assert export_cli("--dataset", str(folders_dataset), "--to", "parquet", str(destination)).exit_code == 0
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
