"""The output layouts by name (`output.layout`): adding one is a `LayoutWriter` module in dataset/ and an entry
here (and its name in the recipe's `OutputSection.layout`)."""

from __future__ import annotations

from mdsd3_cli.dataset.folders_writer import FoldersWriter
from mdsd3_cli.dataset.layout_writer import LayoutWriter
from mdsd3_cli.dataset.webdataset_writer import WebDatasetLayoutWriter

OUTPUT_LAYOUTS: dict[str, type[LayoutWriter]] = {
    "folders": FoldersWriter,
    "webdataset": WebDatasetLayoutWriter,
}
