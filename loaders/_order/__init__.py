"""The epoch's sample order, mixtures of datasets, and resume positions (computed, no I/O)."""
