"""trainio.loaders: the sharded dataset format, its writer and reader.

A dataset is ``index.json`` plus Arrow IPC shard files under ``shards/`` on
any store (see ``FORMAT.md`` beside this file). :class:`DatasetWriter` makes
one, hashing every shard as it is written and committing the index last;
:class:`Dataset` opens one, validates it and reads rows at random.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._batch.collate import Collate
from ._format.convert import infer_columns_schema, infer_schema
from ._format.index import FORMAT_NAME, FORMAT_VERSION, BatchInfo, DatasetIndex, RowDigests, ShardInfo
from ._order.partitions import PartitionError
from ._order.resume_state import PositionUnknown, ResumeMismatch
from ._pack import PackedLoader, PackTokens, pack_documents
from ._read.dataset import Dataset
from ._read.verify import Problem, VerifyReport, verify_dataset
from ._sizes import parse_size
from ._write.build import build_dataset
from ._write.dataset_writer import DatasetWriter, Destination, commit_dataset, prepare_destination
from ._write.shard_file import Compression
from ._write.shard_set import ShardSetWriter

if TYPE_CHECKING:  # imported lazily at run time (they import torch when it is installed); seen by type checkers
    from ._loader import Loader, LoaderError
    from ._streaming import StreamingDataset


def __getattr__(name: str) -> object:
    # StreamingDataset subclasses torch's IterableDataset when torch is installed: import it (and torch) on first use.
    if name == "StreamingDataset":
        from . import _streaming

        return getattr(_streaming, name)
    if name in ("Loader", "LoaderError"):
        from . import _loader

        return getattr(_loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Loader",
    "LoaderError",
    "BatchInfo",
    "Collate",
    "Compression",
    "Dataset",
    "DatasetIndex",
    "DatasetWriter",
    "Destination",
    "Problem",
    "PackTokens",
    "PackedLoader",
    "RowDigests",
    "ShardInfo",
    "ShardSetWriter",
    "StreamingDataset",
    "ResumeMismatch",
    "PartitionError",
    "PositionUnknown",
    "VerifyReport",
    "build_dataset",
    "commit_dataset",
    "infer_columns_schema",
    "infer_schema",
    "pack_documents",
    "parse_size",
    "prepare_destination",
    "verify_dataset",
]
