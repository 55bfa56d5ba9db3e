"""How a batch lays out variable-length fields: the ``lists`` option of Loader and Collate (torch-free)."""

from __future__ import annotations

from typing import Literal, get_args

Lists = Literal["auto", "pad", "pack"]
_LISTS: tuple[str, ...] = get_args(Lists)


def check_lists(lists: str, pad_to: int | None) -> None:
    """Raise ValueError naming the option unless ``lists`` and ``pad_to`` are a layout Loader and Collate take."""
    if lists not in _LISTS:
        raise ValueError(f"lists={lists!r}: must be one of {', '.join(map(repr, _LISTS))}")
    if pad_to is not None and pad_to < 0:
        raise ValueError(f"pad_to={pad_to}: must be >= 0")
