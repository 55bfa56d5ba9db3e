"""Reading a dataset: the opened dataset, its shard readers, the shard check, verify."""
