"""Saving a step: the plan, the snapshot, the exchanges between ranks, the files, rank 0's commit."""
