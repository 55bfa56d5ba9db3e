"""Tiers as a user names them, and the retention rule each applies."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from trainio.storage import LocalOptions, S3Options, Store, open_store


@dataclass(frozen=True)
class Tier:
    """One place checkpoints are kept, fastest first in a manager's list.

    Attributes:
        url: A local path, ``file://`` URL or ``s3://bucket/prefix``, or an open :class:`Store`.
        keep_last: Keep the newest this many steps (None: no limit from this rule).
        keep_every: Keep every step that is a multiple of this (None: no such rule).
            With neither rule set, a tier keeps every step. With only
            ``keep_every``, the tier receives only those steps by promotion.
        name: How messages and results name the tier (default: its URL).
        options: Store options for the URL (e.g. :class:`~trainio.storage.S3Options`).
        scope: ``"shared"`` (default): storage every rank sees. ``"node"``: a
            directory on each node's own disk (its NVMe), seen by that node's
            ranks alone; ``{node}`` in the URL is replaced by the node's index
            (so one machine can simulate many nodes). Only the first tier may
            be a node tier; see "Multi-node jobs" in the README.
        replicas: For a node tier, on how many other nodes each node's files
            are also kept (node ``n``'s copies go to nodes ``n+1 .. n+replicas``,
            modulo the node count), so a lost node's part survives.
        keep_best: Also keep this many steps whose ``metric`` (given at
            ``save(..., metrics={...})``) is best: lowest with ``mode="min"``,
            highest with ``"max"``. A tier with it receives by promotion the
            steps its retention would keep among those it has and is offered.
        metric: The name of the metric ``keep_best`` ranks by.
        mode: ``"min"`` (default) or ``"max"``.
    """

    url: str | os.PathLike[str] | Store
    keep_last: int | None = None
    keep_every: int | None = None
    name: str | None = None
    options: LocalOptions | S3Options | None = None
    scope: str = "shared"
    replicas: int = 0
    keep_best: int | None = None
    metric: str | None = None
    mode: str = "min"

    def __post_init__(self) -> None:
        if self.scope not in ("shared", "node"):
            raise ValueError(f"Tier {self.label}: scope must be 'shared' or 'node', not {self.scope!r}")
        if type(self.replicas) is not int or self.replicas < 0:
            raise ValueError(f"Tier {self.label}: replicas must be an int >= 0, not {self.replicas!r}")
        if self.scope == "shared" and self.replicas:
            raise ValueError(f"Tier {self.label}: replicas are for node tiers (scope='node'); a shared tier is "
                             "one copy every rank sees")
        if self.scope == "node" and (isinstance(self.url, Store) or "://" in os.fspath(self.url)
                                     and not os.fspath(self.url).startswith("file://")):
            raise ValueError(f"Tier {self.label}: a node tier is a local directory path (with {{node}} for "
                             "simulated nodes), not a store or an object-store URL")
        if (self.keep_best is None) != (self.metric is None) or self.mode not in ("min", "max"):
            raise ValueError(f"Tier {self.label}: keep_best and metric go together (keep_best={self.keep_best!r}, "
                             f"metric={self.metric!r}), and mode is 'min' or 'max' (not {self.mode!r})")
        for rule in ("keep_last", "keep_every", "keep_best"):
            value = getattr(self, rule)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"Tier {self.label}: {rule} must be a positive int or None, not {value!r}")

    @property
    def label(self) -> str:
        """The tier's name, or its URL."""
        if self.name:
            return self.name
        return self.url.url if isinstance(self.url, Store) else os.fspath(self.url)

    @classmethod
    def from_config(cls, config: str | os.PathLike[str] | Store | Mapping[str, Any]) -> Tier:
        """A tier from a URL, path, store or a mapping of this class's fields."""
        if not isinstance(config, Mapping):
            return cls(config)
        known = ("url", "keep_last", "keep_every", "name", "scope", "replicas")
        unknown = set(config) - set(known)
        if unknown:
            raise ValueError(f"unknown tier setting(s) {sorted(unknown)}; known: {', '.join(known)}")
        if "url" not in config:
            raise ValueError(f"a tier needs a url: {dict(config)!r}")
        return cls(**config)

    @property
    def node_scoped(self) -> bool:
        """Whether this is a node tier (each node keeps its own directory)."""
        return self.scope == "node"

    def store(self) -> Store:
        """The tier's store: the one given, or opened from its URL with its options."""
        return self.url if isinstance(self.url, Store) else open_store(self.url, options=self.options)

    def node_url(self, node: int) -> str:
        """The URL of node ``node``'s directory of a node tier (``{node}`` replaced)."""
        assert not isinstance(self.url, Store)
        return os.fspath(self.url).replace("{node}", str(node))

    def wants(self, step: int, newer_steps: int) -> bool:
        """Whether the step-count rules keep ``step`` when ``newer_steps`` committed steps are newer than it
        (``keep_last``, ``keep_every``; with no rule at all, every step; ``keep_best`` is :meth:`doomed`'s)."""
        if self.keep_last is None and self.keep_every is None and self.keep_best is None:
            return True
        if self.keep_every is not None and step % self.keep_every == 0:
            return True
        return self.keep_last is not None and newer_steps < self.keep_last

    def doomed(self, steps: Iterable[int], protected: Iterable[int] = (),
               metrics: Mapping[int, float] | None = None) -> list[int]:
        """The steps retention deletes from ``steps``: never the newest, never a protected one, never one of the
        ``keep_best`` best by ``metrics`` (each step's value of ``metric``; steps without one are not ranked)."""
        ordered = sorted(set(steps), reverse=True)
        keep = set(protected) | set(ordered[:1])
        if self.keep_best is not None and metrics:
            sign = 1.0 if self.mode == "min" else -1.0
            ranked = sorted((sign * value, step) for step, value in metrics.items() if step in ordered)
            keep |= {step for _, step in ranked[:self.keep_best]}
        return sorted(s for i, s in enumerate(ordered) if s not in keep and not self.wants(s, i))
