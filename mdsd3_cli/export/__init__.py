"""`mdsd3 export`: convert a finished dataset into formats large-scale trainers read: WebDataset tar shards,
BasicSR paired LMDB and Parquet.

One writer class per format behind one interface (`sample.SampleWriter`: construct, `write(sample)`, `close()`,
`abort()`); each writer makes what it writes appear atomically. `run` converts a dataset with them; the
webdataset output layout of generate (`generate.webdataset_layout`) writes its tars with `webdataset.TarWriter`.
"""
