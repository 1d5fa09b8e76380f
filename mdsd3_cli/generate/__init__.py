"""`mdsd3 generate`: the plan (work items and shards), the run, and the output layouts (folders or webdataset)
it writes through."""
