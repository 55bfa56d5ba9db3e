"""Run a function on N local ranks of a real gloo ``torch.distributed`` job (spawned processes)."""

from __future__ import annotations

import importlib
import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, target: str, out: str, args: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    os.environ["TRAINIO_TEST_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result: dict[str, Any]
    try:
        module, _, name = target.rpartition(".")
        value = getattr(importlib.import_module(module), name)(rank, world, *args)
        result = {"ok": True, "value": value}
    except BaseException as exc:  # noqa: BLE001 - reported to the test in the parent
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a peer may be dead by design
        pass


def run_ranks(world: int, target: str, out: Path, *args: Any, timeout: float = 240) -> list[dict[str, Any]]:
    """Run ``target(rank, world, *args)`` (a dotted name) on ``world`` ranks; each rank's result or error.

    A rank that died without a result (SIGKILL) gets ``{"ok": False, "exitcode": ...}``.
    """
    out.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(_entry, args=(world, free_port(), target, str(out), args), nprocs=world,
                                 join=False, start_method="spawn")
    for process in context.processes:
        process.join(timeout)
    results = []
    for rank, process in enumerate(context.processes):
        if process.is_alive():
            process.kill()
            process.join()
        path = out / f"rank{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists()
                       else {"ok": False, "exitcode": process.exitcode})
    return results


def values(results: list[dict[str, Any]]) -> list[Any]:
    """Every rank's value; fails with the ranks' tracebacks if any rank failed."""
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n".join(r.get("trace", str(r)) for r in failed)
    return [r["value"] for r in results]
