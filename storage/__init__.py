"""trainio.storage: bytes on local disks and object stores, hashed, cached and retried.

The one way trainio touches bytes is a :class:`Store`: :class:`LocalStore` for a
local or parallel file system, :class:`S3Store` for any S3-compatible endpoint,
and :func:`open_store` to get either from a URL. :class:`ZarrStore` lets zarr v3
read and write through any of them, and :class:`ShardCache` keeps remote files
on local disk within a byte budget.
"""

from __future__ import annotations

from ._atomic import fsync_dir, temp_name, temp_owner_is_dead
from ._cache import CacheOptions, ShardCache
from ._documents import (
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    SEAL_FIELD,
    check_seal,
    is_sealed,
    load_sealed,
    parse_json,
    seal_json,
)
from ._eviction import CacheEntry, EvictionPolicy, FurthestInFuture, LeastRecentlyUsed
from ._hashing import DIGEST_NAME, Hasher, check_digest, digest
from ._keys import TEMP_MARKER, check_key
from ._libc import libc_function
from ._local import LocalOptions, LocalStore
from ._open import open_store
from ._parallel import BATCH_BYTES, batched, in_thread, run_all
from ._retry import RetryPolicy
from ._s3 import S3Store
from ._s3_options import S3Options
from ._store import Store
from ._sync_files import sync_files
from ._writeback import start_writeback
from ._writer import StoreWriter
from ._zarr import ZarrStore
from .errors import (
    AlreadyExists,
    CheckpointError,
    FormatError,
    IntegrityError,
    InvalidKey,
    NotFound,
    SchemaMismatch,
    StoreError,
    StoreUnavailable,
    TrainioError,
)

__all__ = [
    "BATCH_BYTES",
    "DIGEST_NAME",
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "SEAL_FIELD",
    "TEMP_MARKER",
    "AlreadyExists",
    "CacheEntry",
    "CacheOptions",
    "CheckpointError",
    "EvictionPolicy",
    "FormatError",
    "FurthestInFuture",
    "Hasher",
    "IntegrityError",
    "InvalidKey",
    "LeastRecentlyUsed",
    "LocalOptions",
    "LocalStore",
    "NotFound",
    "RetryPolicy",
    "S3Options",
    "S3Store",
    "SchemaMismatch",
    "ShardCache",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StoreWriter",
    "TrainioError",
    "ZarrStore",
    "check_digest",
    "check_key",
    "check_seal",
    "digest",
    "fsync_dir",
    "start_writeback",
    "sync_files",
    "is_sealed",
    "batched",
    "libc_function",
    "in_thread",
    "load_sealed",
    "open_store",
    "parse_json",
    "run_all",
    "seal_json",
    "temp_name",
    "temp_owner_is_dead",
]
