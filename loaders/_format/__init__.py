"""The dataset format's documents and columns: index.json, Arrow columns in and out (no I/O)."""
