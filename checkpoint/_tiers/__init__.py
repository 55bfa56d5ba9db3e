"""Tiers: the commit protocol (commit.py), local and object tiers, leases, promotion."""

from __future__ import annotations

import os

from trainio.storage import Store

from .commit import LAST_KNOWN_GOOD, TierIO
from .local import LocalTierIO
from .object import ObjectTierIO


def open_tier_io(store: Store, label: str) -> TierIO:
    """The tier I/O that fits ``store``: step directories where its keys are local files, else prefixes."""
    local = store.local_path(LAST_KNOWN_GOOD)
    if local is not None:
        return LocalTierIO(store, label, os.fspath(local.parent))
    return ObjectTierIO(store, label)
