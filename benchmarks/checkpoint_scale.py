"""The save protocol at cluster scale, simulated in one process without I/O: what each rank computes and sends.

Every rank saves the same state of ``--arrays`` arrays, cycling through five
kinds, each array a different shape (so nothing is computed once for many):
bf16 matrices sharded ``Shard(0)`` over all ranks with rows that do not divide
(FSDP), ``(Replicate(), Shard(0))`` over a nodes x 8 mesh (HSDP),
``(Shard(0), Shard(1))`` over the same 2-D mesh, ``Shard(1)`` over all ranks,
and small replicated float32 vectors (packed). For a sample of ranks (rank 0,
which also decides and commits, and others spread over the job) it runs
``StepSaves.plan`` as that rank would in ``save()``, its exchanges replaced by
a stand-in that hands rank 0 every rank's digests (equal, as in a job whose
ranks agree) and hands the others rank 0's decision, and counts the bytes each
rank sends and receives (pickled, as torch.distributed sends objects):

- ``plan s``: the slowest sampled rank's first ``save()`` planning: hashing its
  replicated arrays, describing its state, the exchange's work (rank 0 checks
  every rank's digests) and its share of the plan;
- ``reuse s``: the same for the next save of the same layout (the plan reused);
- ``max rank bytes``: the most any rank sends or receives per save, agreeing
  on the plan and committing (rank 0: every rank's digests and part digest
  in, its decision and the outcome out to each);
- ``root`` and ``part``: the sizes of the step's root manifest (built as rank 0
  builds it, with every rank's part listed) and of the largest sampled rank's
  part manifest, and the time rank 0 takes to build and check the root;
- ``restore: manifests s``: the slowest sampled rank's manifest work to restore
  its own shards in place: the root parsed afresh, its own part read and
  checked, every chunk's entry found (checked: no other part is read).

Run:  python benchmarks/checkpoint_scale.py [--ranks 1000,4000,10000] [--arrays 1000] [--sample 4] [--json]
``--json`` prints one document for the last ``--ranks`` given: plan_s, reuse_s, root_manifest_bytes,
max_rank_bytes.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _report import machine, machine_lines, markdown_table  # noqa: E402

from trainio.checkpoint import CheckpointOptions  # noqa: E402
from trainio.checkpoint._format import manifest as manifest_module  # noqa: E402
from trainio.checkpoint._format.boxes import Box  # noqa: E402
from trainio.checkpoint._format.manifest import FileEntry, Manifest  # noqa: E402
from trainio.checkpoint._format.nodes import Node  # noqa: E402
from trainio.checkpoint._format.parts import part_bytes, part_key, rank_pack_key, rank_pack_metadata_key  # noqa: E402
from trainio.checkpoint._format.placement import Mesh, Placement, mesh_boxes  # noqa: E402
from trainio.checkpoint._format.state_tree import ArrayLeaf  # noqa: E402
from trainio.checkpoint._format.zarr_layout import group_metadata_key, stored_groups  # noqa: E402
from trainio.checkpoint._recent import Recent  # noqa: E402
from trainio.checkpoint._save.plan import Plan  # noqa: E402
from trainio.checkpoint._save.protocol import StepSaves  # noqa: E402
from trainio.storage import digest  # noqa: E402

CHUNK_BYTES, PACK_BYTES = 64 << 20, 256 << 10


def _size(value: Any) -> int:
    return len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


class _Stand:
    """Rank ``rank``'s exchanges in a world of ``world`` whose every rank sends what this one sends."""

    def __init__(self, rank: int, world: int, decision: Any) -> None:
        self.rank, self.world = rank, world
        self._decision = decision
        self.sent = self.received = 0

    def gather(self, what: str, payload: Any, *, background: bool = False) -> list[Any] | None:
        size = _size(payload)
        if self.rank != 0:
            self.sent += size
            return None
        self.received += size * (self.world - 1)
        return [payload] * self.world

    def broadcast(self, what: str, payload: Any, *, background: bool = False) -> Any:
        if self.rank == 0:
            self.sent += _size(payload) * (self.world - 1)
            return payload
        self.received += _size(self._decision)
        return self._decision

    def all_gather(self, what: str, payload: Any, *, background: bool = False) -> list[Any]:
        raise AssertionError(f"{what}: ranks that agree never exchange their boxes")

    def close(self) -> None:
        """Nothing to release."""


class _Tier:
    def shared_name(self, step: int) -> str:
        return f".trainio-tmp.save-{step}"


def state(rank: int, world: int, arrays: int) -> tuple[Node, list[ArrayLeaf]]:
    """Rank ``rank``'s skeleton and leaves of the benchmark's state (see the module's docstring)."""
    every = Mesh((world,), tuple(range(world)))
    nodes = Mesh((world // 8, 8), tuple(range(world))) if world % 8 == 0 else Mesh((world, 1), tuple(range(world)))
    kinds: list[tuple[Mesh | None, tuple[int | None, ...], tuple[int, int]]] = [
        (every, (0,), (4096, 1024)), (nodes, (None, 0), (1024, 4096)), (nodes, (0, 1), (2048, 8192)),
        (every, (1,), (1000, 11008)), (None, (), (1024, 1))]
    leaves, items = [], []
    vector = np.zeros(4096, dtype=np.float32)
    for a in range(arrays):
        mesh, shards, (rows, width) = kinds[a % len(kinds)]
        path = f"layers.{a // len(kinds)}.p{a % len(kinds)}"
        if mesh is None:
            value = vector[:rows + a % 97]
            leaves.append(ArrayLeaf(path, path, value, "numpy", "float32", "float32", value.shape, 4))
        else:
            shape = (rows + 7 * a + 1, width)
            placement = Placement(mesh, shards)
            box: Box | None = mesh_boxes(shape, placement, only=rank).box(0)
            box = None if box == Box.whole(shape) else box
            leaves.append(ArrayLeaf(path, path, None, "torch", "bfloat16", "uint16", shape, 2, box, True, None,
                                    placement))
        items.append([path, {"t": "array", "path": path}])
    return {"t": "dict", "items": items}, leaves


def simulate(rank: int, world: int, arrays: int, decision: Any) -> dict[str, Any]:
    """One rank's first and second save() planning: times, bytes, and its files."""
    skeleton, leaves = state(rank, world, arrays)
    stand = _Stand(rank, world, decision)
    saves = StepSaves(stand, CheckpointOptions(chunk_bytes=CHUNK_BYTES, pack_bytes=PACK_BYTES))
    start = time.perf_counter()
    plan, _ = saves.plan(1, skeleton, leaves, None, _Tier())  # type: ignore[arg-type]
    first = time.perf_counter() - start
    first_bytes = max(stand.sent, stand.received)
    stand.sent = stand.received = 0
    start = time.perf_counter()
    again, _ = saves.plan(2, skeleton, leaves, None, _Tier())  # type: ignore[arg-type]
    reuse = time.perf_counter() - start
    assert again is plan, "an unchanged layout reuses the plan"
    entry = FileEntry(1 << 20, "0123456789abcdef" * 2)
    files, members = {}, {}
    for unit in plan.owned(rank):
        spec = plan.arrays[unit.path]
        for index in unit.chunks:
            key = f"state.zarr/{unit.path}/c.{'.'.join(map(str, index))}"
            if spec.ranked:  # in the rank's pack
                members[key] = (0, len(members) * 1024, 1024)
            else:
                files[key] = entry
    if members:
        files[rank_pack_key(rank, 0)] = FileEntry(len(members) * 1024, entry.xxh3)
        files[rank_pack_metadata_key(rank, 0)] = FileEntry(400 * len(members), entry.xxh3)
    part = part_bytes(1, rank, files, members)
    report = {"part": [len(part), entry.xxh3], "root": {}, "bytes": len(files) << 20, "files": len(files)}
    commit = _size(report) if rank else _size(report) * (world - 1) + _size({"totals": [1, 1]}) * (world - 1)
    return {"plan_s": first, "reuse_s": reuse, "first_bytes": first_bytes + commit,
            "reuse_bytes": max(stand.sent, stand.received) + commit, "plan": plan, "part_bytes": len(part),
            "files": len(files), "skeleton": skeleton, "rank": rank, "own": list(files), "members": list(members),
            "part": part}


def restore_lookups(root: bytes, run: dict[str, Any]) -> float:
    """A restoring rank's manifest work for its own shards: parse the root, read its part, find each chunk's entry.

    The root is parsed afresh (a new process has nothing cached); a part is
    read only when a chunk it lists is looked up, and only this rank's may be.
    """
    manifest_module._parsed = Recent(32)  # a restoring process starts with nothing parsed
    read: list[str] = []

    def from_tier(key: str, entry: FileEntry) -> bytes:
        read.append(key)
        digest(run["part"])  # what the tier's read checks against the root's entry
        return bytes(run["part"])

    start = time.perf_counter()
    bound = Manifest.from_bytes(root, "simulated", "manifest.json").bind(from_tier, "simulated")
    for key in run["own"]:
        bound.files[key]
    for key in run["members"]:
        bound.files.member(key)  # type: ignore[attr-defined]  # a version-4 step's
    elapsed = time.perf_counter() - start
    assert read in ([], [part_key(run["rank"])]), f"rank {run['rank']} read {read}, not only its own part"
    return elapsed


def root_manifest(plan: Plan, skeleton: Node, world: int, part: int) -> tuple[bytes, float]:
    """The root rank 0 writes for ``plan`` (every rank with a part of ``part`` bytes), and its build+check time."""
    start = time.perf_counter()
    entry = FileEntry(part, "0123456789abcdef" * 2)
    own = [spec for spec in plan.arrays.values() if spec.stored_alone]
    metadata = [group_metadata_key(g) for g in stored_groups(list(plan.arrays.values()))] + \
        [s.metadata_key for s in own]
    root = {key: FileEntry(400, entry.xxh3) for key in metadata}
    if plan.pack is not None:
        root[plan.pack.metadata_key] = FileEntry(400, entry.xxh3)
        root.update({c.key: FileEntry(c.size, entry.xxh3) for c in plan.pack.chunk_files()})
    manifest = Manifest(1, skeleton, plan.arrays, root, world_size=world, pack=plan.pack, parts=[entry] * world,
                        writers=plan.writers, meshes=plan.meshes, totals=(1, 1))
    document = manifest.to_bytes()
    Manifest.from_bytes(document, "simulated", "manifest.json")
    return document, time.perf_counter() - start


def measure(world: int, arrays: int, sample: int) -> dict[str, Any]:
    """The sampled ranks' figures for a world of ``world`` ranks."""
    first = simulate(0, world, arrays, None)
    decision = {"plan": "shared", "key": "0" * 32, "skeletons": False, "name": _Tier().shared_name(1)}
    others = sorted({int(r) for r in np.linspace(1, world - 1, max(1, sample - 1))} - {0}) if world > 1 else []
    runs = [first] + [simulate(rank, world, arrays, decision) for rank in others]
    files = sum(run["files"] for run in runs) / len(runs) * world
    part = max(run["part_bytes"] for run in runs)
    root, root_s = root_manifest(first["plan"], first["skeleton"], world, part)
    restore_s = max(restore_lookups(root, run) for run in runs)
    return {"restore_s": restore_s, "ranks": world, "arrays": arrays, "sampled_ranks": [0, *others],
            "plan_s": max(run["plan_s"] for run in runs), "reuse_s": max(run["reuse_s"] for run in runs),
            "max_rank_bytes": max(run["first_bytes"] for run in runs),
            "max_rank_bytes_reused": max(run["reuse_bytes"] for run in runs),
            "files": int(files), "root_manifest_bytes": len(root), "root_s": root_s, "max_part_bytes": part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1000,4000,10000", help="rank counts, comma-separated")
    parser.add_argument("--arrays", type=int, default=1000)
    parser.add_argument("--sample", type=int, default=4, help="ranks simulated per rank count (rank 0 first)")
    parser.add_argument("--json", action="store_true", help="one JSON document for the last --ranks")
    args = parser.parse_args()
    results = []
    for world in (int(r) for r in args.ranks.split(",")):
        results.append(measure(world, args.arrays, args.sample))
        print(f"  {world} ranks: plan {results[-1]['plan_s']:.3f} s", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results[-1]))
        return
    table = [["ranks", "arrays", "plan s", "reuse s", "max rank bytes (first / reused)", "files in the step",
              "root manifest bytes", "root build+check s", "largest part bytes", "restore: manifests s"]]
    for r in results:
        table.append([f"{r['ranks']:,}", f"{r['arrays']:,}", f"{r['plan_s']:.3f}", f"{r['reuse_s']:.4f}",
                      f"{r['max_rank_bytes']:,} / {r['max_rank_bytes_reused']:,}", f"{r['files']:,}",
                      f"{r['root_manifest_bytes']:,}", f"{r['root_s']:.3f}", f"{r['max_part_bytes']:,}",
                      f"{r['restore_s']:.3f}"])
    print("\n".join(machine_lines(machine(["numpy"]), "(none: no I/O)")))
    print("\n".join(markdown_table(table, left=[])))


if __name__ == "__main__":
    main()
