"""How a shard checker's work on one shard stops short of a digest, and where it stopped (``shard_check.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainio.storage import Hasher

if TYPE_CHECKING:
    from .dataset import MappedFile


class Closed(Exception):
    """The checker was closed while a shard was being hashed."""


class LeftToReaders(Exception):
    """The shard has row digests and its readers check each row they read: it is not hashed (when not in memory,
    only read ahead)."""


class Paused(Exception):
    """The shard's hash (or read-ahead) reached the read-ahead bound: its state is kept for whoever goes on with it."""


@dataclass(slots=True)
class PartialHash:
    """A shard hashed up to ``done`` bytes, paused at the read-ahead bound."""

    mapped: MappedFile
    hasher: Hasher
    done: int


@dataclass(slots=True)
class PartialFetch:
    """A shard its readers check row by row, read into the page cache (not hashed) up to ``done`` bytes of the file
    of ``identity`` (a :attr:`MappedFile.identity`), paused at the read-ahead bound."""

    identity: tuple[int, int, int, int]
    done: int
