"""Batch assembly: row tables, gathers (the C copy routine), staging memory, collate."""
