"""CheckpointOptions: how a CheckpointManager saves, promotes and restores, validated in one place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from ._format.zarr_layout import CHUNK_BYTES, PACK_BYTES, RANK_PACK_BYTES, parse_compression
from ._restore.device_reads import GPU_DIRECT_MODES


@dataclass(frozen=True, kw_only=True)
class CheckpointOptions:
    """How a :class:`CheckpointManager` works; every field is checked when the options are made.

    Attributes:
        async_save: Write in the background (default). With False, ``save``
            returns once the first tier has committed (promotion still runs behind).
        max_pending: Saves that may be in flight at once; the next ``save``
            waits for one to finish. Host staging memory is this many copies of the state.
        threads: Parallel file writers and readers.
        promote_attempts: Tries per promotion of a step before it is reported as failed.
        retry_backoff_s: Pause before the second try, doubling after each.
        chunk_bytes: Largest chunk file of an array; bigger arrays are split
            into chunks written and read in parallel.
        pack_bytes: Arrays up to this size are stored together in the step's
            pack (see :data:`~trainio.checkpoint.PACK_PATH`), not one zarr array
            each: thousands of tiny files per step are slow to create and delete.
        rank_pack_bytes: A sharded array (DTensor, ShardedTensor) whose
            largest shard is at most this size, and not compressed, has its
            chunks stored in the rank packs of the ranks that write them
            (files of up to 32 MiB each, every one checked whole when read), not
            a file per chunk: a rank restoring its shards reads a few big
            files, which a cold disk streams faster. A restore of only some
            keys reads the packs that hold them whole.
        compression: None (default: chunks stored raw, read straight into the
            tensors), ``"zstd"`` or ``"zstd:<level>"``: smaller steps for
            compressible state, at the cost of CPU time on save and restore.
        distributed: Whether saves are collective over the ranks of the
            initialized ``torch.distributed`` job (default: when one with more
            than one rank is). Then every rank must create the manager and
            call ``save``/``restore`` alike; each writes only what it owns, and
            rank 0 commits, promotes and applies retention. The first tier
            is storage every rank sees (a shared file system, S3) or a node
            tier (``Tier(..., scope="node")``).
        ranks_per_node: The ranks of one node, for a node tier (default: the
            ``LOCAL_WORLD_SIZE`` environment variable torchrun sets).
        timeout_s: How long a rank waits for the others at each exchange of a
            multi-rank save or restore before failing, naming the ranks missing.
        lease_s: How long a tier's lease lasts unrenewed. One job writes a tier
            at a time: the first ``save`` takes the first tier's lease and the
            first promotion into a slower tier that tier's (rank 0 alone, in a
            multi-rank job); leases are renewed in the background and checked
            before every commit; a second job is refused naming the holder, and
            a lease left unrenewed this long (its job died) is taken over. Only
            then are a dead writer's leftovers removed. Restoring never needs
            the lease.
        save_interval_steps: :meth:`CheckpointManager.should_save` says yes
            at every multiple of it (None: only on preemption).
        save_on_preemption: Catch SIGTERM (what Kubernetes and Slurm send
            before a kill): :meth:`CheckpointManager.should_save` then says
            yes at the next step every rank reaches, and ``preempted`` turns
            True so the loop can save and leave. The manager must be made in
            the main thread.
        preemption_grace_s: How long after SIGTERM the job may take to save
            and exit before it is ended as SIGTERM would have ended it (the
            orchestrator's grace period, less a margin).
        read_only: Open the tiers only to read (an evaluation job): no write
            access needed, ``save`` and ``promote`` are refused. Otherwise
            every tier must be writable when the manager is made.
        gpu_direct: How a restore reads files into CUDA tensors in place.
            ``"auto"`` (default): with kvikio (``pip install 'trainio[gds]'``)
            straight into device memory where cuFile runs GPUDirect Storage,
            else through reused pinned host buffers copied on a side stream;
            ``"off"``: always the pinned buffers; ``"always"``: kvikio even in
            its or cuFile's compatibility mode. What ran is
            :attr:`ReadReport.to_device`. Every file is checked either way.
    """

    async_save: bool = True
    max_pending: int = 1
    threads: int = 4
    promote_attempts: int = 3
    retry_backoff_s: float = 1.0
    chunk_bytes: int = CHUNK_BYTES
    pack_bytes: int = PACK_BYTES
    rank_pack_bytes: int = RANK_PACK_BYTES
    compression: str | None = None
    distributed: bool | None = None
    ranks_per_node: int | None = None
    timeout_s: float = 600.0
    lease_s: float = 60.0
    save_interval_steps: int | None = None
    save_on_preemption: bool = False
    preemption_grace_s: float = 25.0
    read_only: bool = False
    gpu_direct: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_pending", "threads", "promote_attempts", "chunk_bytes"):
            _check_int(name, getattr(self, name), 1)
        _check_int("pack_bytes", self.pack_bytes, 0)
        _check_int("rank_pack_bytes", self.rank_pack_bytes, 0)
        for name in ("retry_backoff_s", "timeout_s", "lease_s", "preemption_grace_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"CheckpointOptions.{name} must be a non-negative number of seconds, not {value!r}")
        if not self.lease_s > 0 or not self.timeout_s > 0:
            raise ValueError("CheckpointOptions.lease_s and timeout_s must be more than 0 seconds")
        for name in ("async_save", "distributed", "save_on_preemption", "read_only"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "distributed" and value is None):
                raise ValueError(f"CheckpointOptions.{name} must be True or False, not {value!r}")
        for name in ("ranks_per_node", "save_interval_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        parse_compression(self.compression)  # raises ValueError naming what is accepted
        if self.gpu_direct not in GPU_DIRECT_MODES:
            raise ValueError(f"CheckpointOptions.gpu_direct must be one of {', '.join(GPU_DIRECT_MODES)}, "
                             f"not {self.gpu_direct!r}")

    @property
    def codec(self) -> str | None:
        """The zarr codec of ``compression`` (None for raw chunks)."""
        return parse_compression(self.compression)

    @classmethod
    def split_config(cls, config: Mapping[str, Any]) -> tuple[Sequence[Any], CheckpointOptions]:
        """A config mapping's ``tiers`` list, and the options its other keys give.

        Raises:
            ValueError: there is no ``tiers`` list.
            TypeError: a key is no option's name.
        """
        options = dict(config)
        tiers = options.pop("tiers", None)
        if not isinstance(tiers, Sequence) or isinstance(tiers, str):
            raise ValueError("the checkpoint config needs a 'tiers' list")
        return tiers, cls.from_settings(options)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> CheckpointOptions:
        """Options from keyword settings, refusing unknown names with the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"unknown checkpoint option(s) {unknown}; known: {sorted(known)}")
        return cls(**settings)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"CheckpointOptions.{name} must be an int >= {minimum}, not {value!r}")
