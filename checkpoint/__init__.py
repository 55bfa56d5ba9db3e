"""trainio.checkpoint: the tiered, asynchronous, verified checkpoint store.

A :class:`CheckpointManager` saves training state (nested dicts of tensors,
arrays, JSON values and objects with ``state_dict()``) to a list of
:class:`Tier` s, fastest first: the save returns once the state is in host
memory, a background thread writes it as a zarr v3 group plus a manifest
(the commit point), and later tiers receive copies by promotion. Restores
check every file's xxh3-128 and fall back to slower tiers.
"""

from __future__ import annotations

from ._admin import (
    GcReport,
    StepInfo,
    VerifyReport,
    collect_garbage,
    list_steps,
    promote_step,
    read_manifest,
    verify_checkpoint,
    walk_tree,
)
from ._format.manifest import FileEntry, Manifest
from ._format.per_rank import PerRank
from ._format.zarr_layout import PACK_PATH, ArraySpec
from ._handle import SaveHandle, TierResult
from ._manager import CheckpointManager
from ._options import CheckpointOptions
from ._restore.report import ReadReport
from ._tier import Tier

__all__ = [
    "ArraySpec",
    "CheckpointManager",
    "CheckpointOptions",
    "FileEntry",
    "GcReport",
    "Manifest",
    "PACK_PATH",
    "PerRank",
    "ReadReport",
    "SaveHandle",
    "StepInfo",
    "Tier",
    "TierResult",
    "VerifyReport",
    "collect_garbage",
    "list_steps",
    "promote_step",
    "read_manifest",
    "verify_checkpoint",
    "walk_tree",
]
