"""Dataset formats large-scale trainers read: WebDataset tar shards, BasicSR paired LMDB and Parquet.

One writer class per format behind one interface (`sample.SampleWriter`: construct, `write(sample)`, `close()`,
`abort()`); each writer makes what it writes appear atomically. `layout` picks the writer a generate run
uses for its `output.layout`; `mdsd3_cli.export` converts a finished folders dataset with them.
"""
