"""What a restore read, and from where."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReadReport:
    """What a restore read: from which tiers, what it had to fall back on, what it repaired."""

    step: int
    files: int = 0
    bytes: int = 0
    fell_back: dict[str, str] = field(default_factory=dict)
    repaired: list[str] = field(default_factory=list)
    from_tiers: dict[str, int] = field(default_factory=dict)
    """Bytes read from each tier, by its name (a node tier's are counted below instead)."""
    from_node: int = 0
    """Bytes read from this rank's own node's directory of a node tier."""
    from_peers: int = 0
    """Bytes of a node tier that other nodes sent (their own files or their replicas)."""
    to_device: str = ""
    """How files were read into CUDA tensors in place: "pinned-host", or kvikio's "gds", "cufile-compat" or
    "kvikio-posix" (see :data:`~trainio.checkpoint.CheckpointOptions.gpu_direct`); "" when none was."""
    to_device_bytes: int = 0
    """Bytes read that way."""

    def count(self, source: str, nbytes: int) -> None:
        """Add ``nbytes`` read from ``source`` ("node", "peers", or a tier's name)."""
        if source == "node":
            self.from_node += nbytes
        elif source == "peers":
            self.from_peers += nbytes
        else:
            self.from_tiers[source] = self.from_tiers.get(source, 0) + nbytes
