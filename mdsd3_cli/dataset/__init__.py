"""The on-disk format of a generate output: its names (`names`), run.json, manifest records and their one reader
(`reader`), stored images (files or tar members), both output layouts' writers (`layouts`), ownership of an output
folder, verify and preview."""
