"""The multi-rank part of checkpoint_bench: N local gloo ranks save and restore one sharded state.

Every rank holds its Shard(0) slice of each parameter and optimizer tensor
(DTensors on a 1-D mesh) and the scalars whole. Rows, timed from before a
barrier to after one (so a row is the slowest rank's time):
- memcpy: each rank copies its shards into preallocated tensors;
- raw write+sync / read: each rank writes its shards' bytes as new files of trainio's chunk size with trainio's
  threads and makes them durable, then reads them with as many threads;
- trainio: ``save`` blocking (the slowest rank's), to committed on every rank; each round of it follows a round
  of the raw write (the best of each is shown), so that the disk's drift hits both;
- dcp.save, dcp.async_save (blocking, and to done);
- ``restore(into=)``, dcp.load and the raw read, warm and cold, in turn (``checkpoint_bench.in_turn``: the median
  of the rounds; cold: every rank's files of all three dropped from the page cache, ``sync``, half a second to
  settle);
- with ``nodes``, a node tier (``ranks // nodes`` ranks a node, ``{node}`` in
  its path, one replica) before a shared tier: ``save`` blocking, to committed
  on every node with its replica, against each rank writing its own and its
  replica's bytes to two files with fsync; restore from the own node warm and
  cold, after a node's directory is lost (its part comes from a peer's
  replica), and the promotion to the shared tier (every rank uploads its part).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainio.checkpoint import CheckpointManager, Tier
from trainio.tools._bench_limits import destination


def _sharded(state: Any, mesh: Any) -> Any:
    from torch.distributed.tensor import Shard, distribute_tensor

    if isinstance(state, torch.Tensor):
        if state.dim() and state.shape[0] >= mesh.size():
            return distribute_tensor(state, mesh, [Shard(0)], src_data_rank=None)
        return state
    if isinstance(state, dict):
        return {k: _sharded(v, mesh) for k, v in state.items()}
    if isinstance(state, list):
        return [_sharded(v, mesh) for v in state]
    return state


def _locals(state: Any) -> list[torch.Tensor]:
    from checkpoint_bench import tensors_of

    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors_of(state)]


def _all(fn: Callable[[], Any]) -> float:
    """Seconds from all ranks starting ``fn`` to all ranks having finished it."""
    gc.collect()
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _slowest(seconds: float) -> float:
    value = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def _drop(path: Path) -> None:
    from checkpoint_bench import drop_cache

    if dist.get_rank() == 0:
        drop_cache(path)
    dist.barrier()


def _best(fn: Callable[[], Any], repeat: int, before: Callable[[], Any] = lambda: None) -> float:
    from _report import best

    return best(fn, repeat, before, timer=_all)


def _async_rounds(start: Callable[[], Any], finish: Callable[[Any], Any], before: Callable[[], Any],
                  repeat: int) -> tuple[float, float]:
    """The best time the slowest rank was held by ``start``, and the best time to all ranks having finished."""
    blocked, total = [], []
    for _ in range(repeat):
        before()
        gc.collect()
        dist.barrier()
        began = time.perf_counter()
        pending = start()
        blocked.append(_slowest(time.perf_counter() - began))
        finish(pending)
        dist.barrier()
        total.append(time.perf_counter() - began)
    return min(blocked), min(total)


def _raw_files(root: Path, shards: list[torch.Tensor], buffer: torch.Tensor) -> tuple[Callable[[], float], list[Path]]:
    """The write limit with trainio's parallelism on every rank (its threads writing this rank's bytes as new
    files of its chunk size, made durable: one of DurableWrite's ways a call), and such files left for the read
    limit. The limit writes bytes like every shard's (a prefix of each), as checkpoint_bench's does: a disk under a
    compressing host writes some data faster, and the master weights (bfloat16 values as float32) compress."""
    from trainio.checkpoint import CheckpointOptions
    from trainio.tools._bench_limits import DurableWrite

    options = CheckpointOptions()
    mine = root / str(dist.get_rank())
    mine.mkdir(parents=True, exist_ok=True)
    view = memoryview(buffer.numpy())
    like = [memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) for t in shards]
    write = DurableWrite(mine, like, options.threads, options.chunk_bytes)
    files = []
    for i, start in enumerate(range(0, view.nbytes, options.chunk_bytes)):
        files.append(mine / f"{i}.bin")
        files[-1].write_bytes(view[start:start + options.chunk_bytes])
    os.sync()
    return write, files


def _restores_in_turn(contenders: list[tuple[str, Callable[[], Any]]], paths: list[Path],
                      repeat: int) -> list[tuple[str, str, float]]:
    """Warm and cold rows of every reader in ``contenders``, measured in turn on every rank
    (``checkpoint_bench.in_turn``); a cold run follows a drop of every rank's files of all of them."""
    from checkpoint_bench import in_turn

    def cool() -> None:
        for path in paths:
            _drop(path)

    return in_turn(contenders, repeat, cool, _all)


def _fresh(path: Path) -> None:
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def _fresh_steps(*tiers: Path) -> None:
    """Drop the tiers' steps (not the writing job's lease), so the next save writes every file."""
    from checkpoint_bench import fresh_steps

    if dist.get_rank() == 0:
        for tier in tiers:
            if tier.is_dir():
                fresh_steps(tier)
    dist.barrier()


def _node_rows(base: Path, state: Any, shards: list[torch.Tensor], buffer: torch.Tensor, nodes: int,
               repeat: int) -> list[tuple[str, str, float]]:
    from checkpoint_bench import like

    rank, world = dist.get_rank(), dist.get_world_size()
    per_node = world // nodes
    os.environ["LOCAL_WORLD_SIZE"] = str(per_node)
    rows: list[tuple[str, str, float]] = []
    own, replica = base / f"raw-{rank}.bin", base / f"raw-{rank}.replica"

    def write_two() -> None:
        for path in (own, replica):
            with open(path, "wb") as f:
                f.write(buffer.numpy().data)
                f.flush()
                os.fsync(f.fileno())

    rows.append(("node durable save", "raw write+fsync of own + replica bytes", _best(write_two, repeat)))
    own.unlink()
    replica.unlink()
    node_root = base / "nodes"
    tiers = [Tier(node_root / "n{node}", scope="node", replicas=1, keep_last=1),
             Tier(base / "shared", keep_last=1)]
    with CheckpointManager(tiers, timeout_s=600) as manager:
        manager.save(0, state).wait()
        manager.wait()
        steps = iter(range(1, repeat + 2))
        blocked, committed, promoted = [], [], []
        for _ in range(repeat):  # each round from empty node directories: a full write
            manager.wait()
            _fresh_steps(*(node_root / f"n{n}" for n in range(nodes)), base / "shared")
            gc.collect()
            dist.barrier()
            began = time.perf_counter()
            handle = manager.save(next(steps), state)
            blocked.append(_slowest(time.perf_counter() - began))
            handle.wait()
            dist.barrier()
            committed.append(time.perf_counter() - began)
            manager.wait()
            dist.barrier()
            promoted.append(time.perf_counter() - began - committed[-1])
        rows += [("blocking", "trainio node tier save()", min(blocked)),
                 ("node durable save", "trainio node tier, own + 1 replica, to committed", min(committed)),
                 ("promotion", "node tier -> shared tier (every rank uploads its part)", min(promoted))]
        manager.save(next(steps), state).wait()
        manager.wait()
        target = like(state)
        rows += _restores_in_turn([("trainio restore from own node", lambda: manager.restore(into=target, tiers=[0]))],
                                  [node_root], repeat)
        assert all(torch.equal(a, b) for a, b in zip(_locals(target), shards, strict=True))

        def lose_node() -> None:
            if rank == 0:
                shutil.rmtree(node_root / "n1", ignore_errors=True)
            dist.barrier()

        rows.append(("restore after losing a node", "trainio, node 1's part from its replica",
                     _best(lambda: manager.restore(into=target, tiers=[0]), repeat, lose_node)))
        assert all(torch.equal(a, b) for a, b in zip(_locals(target), shards, strict=True))
    _fresh(node_root)
    _fresh(base / "shared")
    return rows


def _worker(rank: int, world: int, port: int, root: str, gb: float, repeat: int, out: str, nodes: int) -> None:
    from checkpoint_bench import like, raw_reads, state_of
    from torch.distributed.device_mesh import init_device_mesh

    from trainio.tools._bench_limits import DurableWrite

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # Each rank's torch copies get its share of the cores, not torch's default of all of them: 2 ranks on 16
    # cores measured a memcpy floor of 1.3 GB/s, slower than trainio's blocking save (oversubscribed intra-op
    # threads, most likely; not yet rerun there).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    mesh = init_device_mesh("cpu", (world,))
    state = _sharded(state_of(gb), mesh)
    gc.collect()
    rows: list[tuple[str, str, float]] = []
    base = Path(root)
    shards = _locals(state)
    copies = [torch.empty_like(t) for t in shards]
    for c in copies:
        c.zero_()
    rows.append(("blocking (memcpy floor)", "memcpy of each rank's shards", _best(
        lambda: [c.copy_(t) for c, t in zip(copies, shards, strict=True)], repeat)))

    buffer = torch.cat([t.reshape(-1).view(torch.uint8) for t in shards])
    base.mkdir(parents=True, exist_ok=True)
    raw_write, files = _raw_files(base / "raw", shards, buffer)

    import torch.distributed.checkpoint as dcp

    tier, dcp_path = base / "trainio", base / "dcp"
    with CheckpointManager([Tier(tier, keep_last=1)], timeout_s=600) as manager:
        manager.save(0, state).wait()
        rounds = max(repeat, 2 * len(DurableWrite.WAYS))  # each way of the limit twice
        steps = iter(range(1, rounds + 1))
        raw, blocked, total = [], [], []
        for _ in range(rounds):  # the limit and trainio's save in turn: this disk's moods change by the minute
            gc.collect()
            dist.barrier()
            raw.append(_slowest(raw_write()))  # its own time: not the untimed removal of its files after it
            # Each round starts from an empty tier: no earlier step to link unchanged files from, a full write.
            held, done = _async_rounds(lambda: manager.save(next(steps), state), lambda h: h.wait(),
                                       lambda: _fresh_steps(tier), 1)
            blocked.append(held)
            total.append(done)
        rows += [("durable save", f"raw write+sync, {manager.options.threads} threads a rank", min(raw)),
                 ("blocking", "trainio save()", min(blocked)), ("durable save", "trainio save() to committed", min(total))]
        rows.append(("durable save", "dcp.save", _best(lambda: dcp.save(state, checkpoint_id=str(dcp_path)), repeat,
                                                      lambda: _fresh(dcp_path))))
        blocked, total = _async_rounds(lambda: dcp.async_save(state, checkpoint_id=str(dcp_path)),
                                       lambda f: f.result(), lambda: _fresh(dcp_path), repeat)
        rows += [("blocking", "dcp.async_save", blocked), ("durable save", "dcp.async_save to done", total)]
        target, dcp_target = like(state), like(state)
        into = destination(files)  # a restore puts every byte in a place of its own, as the limit does
        readers = [*raw_reads(files, manager.options.threads, into, " a rank"),
                   ("trainio restore(into=)", lambda: manager.restore(into=target)),
                   ("dcp.load (into)", lambda: dcp.load(dcp_target, checkpoint_id=str(dcp_path)))]
        rows += _restores_in_turn(readers, [base / "raw", tier, dcp_path], repeat)
        for restored in (target, dcp_target):
            assert all(torch.equal(a, b) for a, b in zip(_locals(restored), shards, strict=True))
    for path in (tier, base / "raw", dcp_path):
        _fresh(path)
    if nodes:
        rows += _node_rows(base, state, shards, buffer, nodes, repeat)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def run(root: Path, gb: float, ranks: int, repeat: int, nodes: int = 0) -> list[tuple[str, str, float]]:
    """Spawn ``ranks`` processes and return the rows rank 0 measured (node-tier rows too with ``nodes``)."""
    from checkpoint_bench import free_port

    out = root / "ranks.json"
    mp.spawn(_worker, args=(ranks, free_port(), str(root), gb, repeat, str(out), nodes), nprocs=ranks)
    return [tuple(row) for row in json.loads(out.read_text())]  # type: ignore[misc]
