"""`mdsd3 export`: convert a finished dataset into formats large-scale trainers read: WebDataset tar shards,
BasicSR paired LMDB and Parquet.

One writer class per format behind one interface (`sample.SampleWriter`: `open(target)`, `write(sample)`,
`close()`, `abort()`), listed by name in `formats.EXPORT_FORMATS`; each writer makes what it writes appear
atomically. `run` converts a dataset with them. The tar format is the webdataset output layout's
(`dataset.tar_format`).
"""
