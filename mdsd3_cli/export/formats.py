"""The export formats by name: adding one is a writer module in export/ (a `SampleWriter` with an `open(target)`
class method) and an entry here."""

from __future__ import annotations

from collections.abc import Callable

from mdsd3_cli.export.basicsr_lmdb import LmdbWriter
from mdsd3_cli.export.parquet import ParquetWriter
from mdsd3_cli.export.sample import ExportTarget, SampleWriter
from mdsd3_cli.export.webdataset import WebDatasetWriter

EXPORT_FORMATS: dict[str, Callable[[ExportTarget], SampleWriter]] = {
    "webdataset": WebDatasetWriter.open,
    "lmdb": LmdbWriter.open,
    "parquet": ParquetWriter.open,
}
"""`mdsd3 export --to NAME` -> the opener of its writer."""
