"""The on-disk contract of a generate output: the folders writer and run.json, manifest records, stored images
(files or tar members), ownership of an output folder, verify and preview."""
