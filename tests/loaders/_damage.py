"""Helpers that damage or hand-edit a dataset on disk, for the tests of what readers refuse."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainio.storage import SEAL_FIELD, seal_json


def edit_index(dataset: Path, edit: Callable[[dict[str, Any]], object], *, seal: bool = True) -> None:
    """Apply ``edit`` to the dataset's ``index.json``; sealed again (as a careful hand edit would) unless ``seal`` is False."""
    document = json.loads((dataset / "index.json").read_bytes())
    document.pop(SEAL_FIELD, None)
    edit(document)
    data = seal_json(document, indent=1) if seal else json.dumps(document, indent=1).encode()
    (dataset / "index.json").write_bytes(data)


def drop_row_digests(dataset: Path) -> Path:
    """Make the dataset one whose shards are checked whole (as one written before row digests, or with a field
    not gathered by rows): its row digests files deleted and unlisted."""
    def edit(document: dict[str, Any]) -> None:
        for shard in document["shards"]:
            rows = shard.pop("row_xxh3", None)
            if rows is not None:
                (dataset / rows["path"]).unlink()

    edit_index(dataset, edit)
    return dataset


def flip_bit(path: Path, position: int, bit: int = 2) -> None:
    """Flip one bit of the byte at ``position`` of the file (negative counts from the end)."""
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))
