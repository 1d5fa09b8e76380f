"""Parquet: one row per pair (both images' bytes and the manifest fields), in files of at most
`rows_per_file` rows that Hugging Face `datasets` loads with typed columns and decodes images from."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mdsd3_cli.dataset.tar_format import EncodedSample
from mdsd3_cli.export.sample import ExportTarget
from mdsd3_cli.export.staging import StagedFolder
from mdsd3_cli.util.atomic import AtomicFile, naming

FILE_PATTERN = "data-{index:05d}.parquet"
ROW_GROUP_ROWS = 100
ROW_GROUP_BYTES = 64 * 2**20
"""A row group is written at ROW_GROUP_ROWS rows or ROW_GROUP_BYTES of images, whichever comes first
(what bounds the writer's memory)."""
PARTIAL_METADATA_KEY = "mdsd3_partial_export"
DEFAULT_ROWS_PER_FILE = 1000
"""Pairs per file."""
"""Schema metadata key (every file) of a --partial export: why it is partial and what was left out (JSON)."""
_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCALAR_FIELDS: list[tuple[str, pa.DataType, str]] = [
    ("key", pa.string(), "string"),
    ("folder", pa.string(), "string"),
    ("variant", pa.string(), "string"),
    ("repeat", pa.int32(), "int32"),
    ("seed", pa.int64(), "int64"),
    ("prompt", pa.string(), "string"),
    ("alpha", pa.float64(), "float64"),
    ("beta", pa.float64(), "float64"),
    ("steps", pa.int32(), "int32"),
    ("guidance", pa.float64(), "float64"),
    ("width", pa.int32(), "int32"),
    ("height", pa.int32(), "int32"),
]


def pair_schema(classes: Sequence[str], partial: Mapping[str, Any] | None = None) -> pa.Schema:
    """Columns: the scalar manifest fields, `ratios` (one float per class), `clean` and `degraded` images
    (Hugging Face's Image struct), `manifest` (the whole record as JSON); `datasets` features in the metadata,
    and `partial` under PARTIAL_METADATA_KEY when given."""
    fields = [pa.field(name, kind) for name, kind, _ in SCALAR_FIELDS]
    fields += [
        pa.field("ratios", pa.struct([(name, pa.float64()) for name in classes])),
        pa.field("clean", _IMAGE),
        pa.field("degraded", _IMAGE),
        pa.field("manifest", pa.string()),
    ]
    features: dict[str, Any] = {name: {"dtype": dtype, "_type": "Value"} for name, _, dtype in SCALAR_FIELDS}
    features["ratios"] = {name: {"dtype": "float64", "_type": "Value"} for name in classes}
    features.update(
        clean={"_type": "Image"}, degraded={"_type": "Image"}, manifest={"dtype": "string", "_type": "Value"}
    )
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    if partial is not None:
        metadata[PARTIAL_METADATA_KEY] = json.dumps(dict(partial), sort_keys=True)
    return pa.schema(fields, metadata=metadata)


class ParquetWriter:
    """Writes `data-00000.parquet, ...` under `destination`, appearing as a whole on `close()`."""

    def __init__(
        self, destination: Path, classes: Sequence[str], rows_per_file: int, partial: Mapping[str, Any] | None = None
    ) -> None:
        if rows_per_file < 1:
            raise ValueError(f"rows per file must be at least 1, got {rows_per_file}")
        self.schema = pair_schema(classes, partial)
        self.classes = list(classes)
        self.rows_per_file = rows_per_file
        self._folder = StagedFolder(destination)
        self._rows: list[dict[str, Any]] = []
        self._buffered_bytes = 0
        self._file: AtomicFile | None = None
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0
        self.files = 0

    @classmethod
    def open(cls, target: ExportTarget) -> ParquetWriter:
        return cls(target.destination, target.classes, target.per_file or DEFAULT_ROWS_PER_FILE, target.partial)

    def how_to_read(self) -> str:
        return f'datasets.load_dataset("parquet", data_dir="{self._folder.path}")'

    def write(self, sample: EncodedSample) -> None:
        record = sample.record
        row = {name: record.get(name) for name, _, _ in SCALAR_FIELDS}
        row["width"], row["height"] = record["size"]
        row["ratios"] = {name: record["ratios"].get(name, 0.0) for name in self.classes}
        row["clean"] = {"bytes": sample.clean, "path": record.get("clean")}
        row["degraded"] = {"bytes": sample.degraded, "path": record.get("degraded")}
        row["manifest"] = json.dumps(record, sort_keys=True)
        self._rows.append(row)
        self._rows_in_file += 1
        self._buffered_bytes += len(sample.clean) + len(sample.degraded)
        if (
            len(self._rows) == ROW_GROUP_ROWS
            or self._buffered_bytes >= ROW_GROUP_BYTES
            or self._rows_in_file == self.rows_per_file
        ):
            self._flush()

    def close(self) -> None:
        self._flush()
        self._finish_file()
        self._folder.commit()

    def abort(self) -> None:
        try:
            if self._writer is not None:
                try:
                    self._writer.close()  # writes the footer: may fail again on a full disk
                except OSError:
                    pass
                self._file.discard()
        finally:
            self._folder.discard()

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            self._file = AtomicFile(self._folder.stage / FILE_PATTERN.format(index=self.files))
            self._writer = pq.ParquetWriter(self._file.file, self.schema)
            self.files += 1
        try:
            self._writer.write_table(
                pa.Table.from_pylist(self._rows, schema=self.schema), row_group_size=ROW_GROUP_ROWS
            )
        except OSError as error:
            raise naming(error, self._file.path) from None
        self._rows, self._buffered_bytes = [], 0
        if self._rows_in_file == self.rows_per_file:
            self._finish_file()

    def _finish_file(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError as error:
                raise naming(error, self._file.path) from None
            self._file.commit()
            self._writer, self._file, self._rows_in_file = None, None, 0
