"""Writing a dataset: shard files, the shard set that fills them, and the commit (index last)."""
