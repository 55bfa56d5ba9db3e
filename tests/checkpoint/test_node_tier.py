"""A node tier on 8 gloo ranks as 4 simulated nodes of 2: replicas, promotion, restore from peers and tiers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from trainio.checkpoint import CheckpointManager, FileEntry, Tier

from ._ranks import run_ranks, values

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.tensor")

HERE = "tests.checkpoint.test_node_tier"
CHUNK = 4 << 10


def tiers(root: str, keep_last: int | None = None) -> list[Tier]:
    """A node tier with one replica per node, then a shared tier."""
    return [Tier(f"{root}/n{{node}}/nvme", scope="node", replicas=1, keep_last=keep_last, name="nvme"),
            Tier(f"{root}/shared", name="shared")]


def full_state(step: int) -> dict[str, Any]:
    """The whole tensors of ``step``; the same on every rank."""
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 40, generator=g),  # Shard(0): 8 rows a rank
            "b": torch.randn(30, 16, generator=g).to(torch.bfloat16),  # Shard(0) over 8: uneven (4 x 7, 2)
            "rep": torch.randn(32, 32, generator=g),  # replicated
            "step": step}


def sharded(step: int, world: int) -> dict[str, Any]:
    """``full_state(step)`` with ``w`` and ``b`` as DTensors sharded over every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    state = full_state(step)
    for key in ("w", "b"):
        state[key] = distribute_tensor(state[key], mesh, [Shard(0)])
    return state


def empty_like(world: int) -> dict[str, Any]:
    """A target to restore into: DTensors of the saved shapes, zeros."""
    state = sharded(0, world) if world > 1 else full_state(0)
    for key in ("w", "b", "rep"):
        state[key] = state[key] * 0
    return state


def save_job(rank: int, world: int, root: str, steps: list[int]) -> bool:
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    with CheckpointManager(tiers(root), chunk_bytes=CHUNK, pack_bytes=256, rank_pack_bytes=256) as manager:
        for step in steps:
            manager.save(step, sharded(step, world)).wait()
    return True


def _check(state: dict[str, Any], step: int) -> dict[str, bool]:
    expected = full_state(step)
    found = {}
    for key in ("w", "b", "rep"):
        value = state[key]
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        found[key] = bool(torch.equal(value, expected[key]))
    found["step"] = state["step"] == step
    return found


def restore_job(rank: int, world: int, root: str, per_node: int, chosen: list[str] | None,
                round_bytes: int | None = None) -> dict[str, Any]:
    from trainio.checkpoint._save import bundle

    if round_bytes is not None:  # files travel in many rounds
        bundle.ROUND_BYTES = round_bytes
    os.environ["LOCAL_WORLD_SIZE"] = str(per_node)
    with CheckpointManager(tiers(root), chunk_bytes=CHUNK) as manager:
        state, report = manager.restore_with_report(into=empty_like(world), tiers=chosen)
    return {"step": report.step, "equal": _check(state, report.step), "node": report.from_node,
            "peers": report.from_peers, "tiers": report.from_tiers, "repaired": report.repaired}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three steps saved by 8 ranks as 4 nodes, kept pristine: each test copies it."""
    root = tmp_path_factory.mktemp("nodes") / "run"
    values(run_ranks(8, f"{HERE}.save_job", root.parent / "out", str(root), [1, 2, 3]))
    return root


def copy_of(saved: Path, tmp_path: Path) -> Path:
    root = tmp_path / "run"
    shutil.copytree(saved, root)
    return root


def all_equal(results: list[dict[str, Any]], step: int = 3) -> None:
    for result in results:
        assert result["step"] == step
        assert all(result["equal"].values()), result


def test_save_writes_parts_and_replicas_on_every_node_and_promotes(saved: Path) -> None:
    from trainio.checkpoint._tiers.node_tier import NODE_RECORD, NodeRecord

    for node in range(4):
        step_dir = saved / f"n{node}" / "nvme" / "000000000003"
        record = NodeRecord.from_bytes((step_dir / NODE_RECORD).read_bytes(), "test", NODE_RECORD, 3)
        own = {2 * node, 2 * node + 1}
        replica = {2 * ((node - 1) % 4), 2 * ((node - 1) % 4) + 1}
        assert set(record.parts) == own | replica
        assert record.root_files == (node in (0, 1))
        assert record.part_count == 8
        for rank in own | replica:
            assert (step_dir / "parts" / f"{rank:06d}.json").is_file()
    steps = CheckpointManager([Tier(saved / "shared")]).steps()
    assert list(steps.values()) == [[1, 2, 3]]
    restored = CheckpointManager([Tier(saved / "shared")]).restore()
    assert _check(restored, 3) == {"w": True, "b": True, "rep": True, "step": True}


def test_restore_reads_own_nodes_and_a_lost_node_gets_its_part_from_a_peer(saved: Path, tmp_path: Path) -> None:
    root = copy_of(saved, tmp_path)
    results = values(run_ranks(8, f"{HERE}.restore_job", tmp_path / "o1", str(root), 2, None))
    all_equal(results)
    assert all(r["tiers"] == {} for r in results)
    shutil.rmtree(root / "n1")
    (root / "shared").rename(root / "shared.hidden")
    results = values(run_ranks(8, f"{HERE}.restore_job", tmp_path / "o2", str(root), 2, None, 2000))
    all_equal(results)
    assert all(not r["tiers"].get("shared") for r in results)
    assert results[2]["peers"] > 0 and results[3]["peers"] > 0
    assert any(r["repaired"] for r in results[2:4])
    assert (root / "n1" / "nvme" / "000000000003" / "parts" / "000002.json").is_file()


def test_permuted_node_directories_still_restore_without_the_shared_tier(saved: Path, tmp_path: Path) -> None:
    root = copy_of(saved, tmp_path)
    (root / "n0").rename(root / "tmp")
    (root / "n2").rename(root / "n0")
    (root / "tmp").rename(root / "n2")
    (root / "shared").rename(root / "shared.hidden")
    results = values(run_ranks(8, f"{HERE}.restore_job", tmp_path / "o", str(root), 2, None))
    all_equal(results)
    assert all(not r["tiers"].get("shared") for r in results)
    assert results[0]["peers"] > 0


def test_parts_on_no_node_come_from_the_shared_tier(saved: Path, tmp_path: Path) -> None:
    root = copy_of(saved, tmp_path)
    shutil.rmtree(root / "n1")  # ranks 2, 3: their replica was on node 2
    shutil.rmtree(root / "n2")  # ranks 4, 5: their replica is on node 3
    results = values(run_ranks(8, f"{HERE}.restore_job", tmp_path / "o", str(root), 2, None))
    all_equal(results)
    assert results[2]["tiers"].get("shared", 0) > 0
    assert sum(r["peers"] for r in results) > 0


def test_restore_into_fewer_ranks_and_one_process(saved: Path, tmp_path: Path) -> None:
    root = copy_of(saved, tmp_path)
    all_equal(values(run_ranks(4, f"{HERE}.restore_job", tmp_path / "o", str(root), 2, None)))
    with CheckpointManager(tiers(str(root))) as manager:
        state, report = manager.restore_with_report()
    assert _check(state, 3) == {"w": True, "b": True, "rep": True, "step": True}
    assert report.from_node > 0 and report.from_tiers.get("shared", 0) > 0


def test_a_node_tier_in_a_multi_rank_job_needs_ranks_per_node(tmp_path: Path) -> None:
    assert Tier(tmp_path / "n{node}", scope="node", replicas=2).node_url(3) == f"{tmp_path}/n3"
    with pytest.raises(ValueError, match="replicas are for node tiers"):
        Tier(tmp_path, replicas=1)
    with pytest.raises(ValueError, match="local directory"):
        Tier("s3://bucket/x", scope="node")
    with pytest.raises(ValueError, match="only the first tier"):
        CheckpointManager([Tier(tmp_path / "a"), Tier(tmp_path / "b", scope="node")])


def failing_save_job(rank: int, world: int, root: str, how: str) -> dict[str, Any]:
    """Step 1 commits; step 2 dies (rank 3 is killed while replicas are sent) or fails (node 2's disk is full)."""
    import errno
    import signal

    from trainio.checkpoint._save.collective import Collective
    from trainio.checkpoint._tiers import local
    from trainio.storage import CheckpointError

    os.environ["LOCAL_WORLD_SIZE"] = "2"
    seen: dict[str, Any] = {}
    with CheckpointManager(tiers(root), chunk_bytes=CHUNK, timeout_s=10) as manager:
        manager.save(1, sharded(1, world)).wait()
        manager.wait()
        if how == "kill" and rank == 3:
            exchange = Collective.exchange

            def dying(self: Any, what: str, outgoing: dict[int, bytes], **kw: Any) -> dict[int, bytes]:
                if "replicas" in what:
                    os.kill(os.getpid(), signal.SIGKILL)
                return exchange(self, what, outgoing, **kw)

            Collective.exchange = dying  # type: ignore[method-assign]
        if how == "full" and rank in (4, 5):
            def full(fd: int, data: Any) -> int:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            local._write = full
        try:
            manager.save(2, sharded(2, world)).wait(timeout=120)
            seen["step2"] = "committed"
        except CheckpointError as exc:
            seen["step2"] = str(exc)
        if how == "full":
            seen["steps"] = manager.steps()
    return seen


def test_a_rank_killed_while_replicas_are_sent_fails_the_step_everywhere(tmp_path: Path) -> None:
    import re

    root = tmp_path / "run"
    results = run_ranks(8, f"{HERE}.failing_save_job", tmp_path / "out", str(root), "kill", timeout=180)
    assert results[3] == {"ok": False, "exitcode": -9}
    for survivor in values(results[:3] + results[4:]):
        named = re.search(r"rank\(s\) \[([\d, ]+)\] did not report", survivor["step2"])
        assert named and 3 in [int(r) for r in named.group(1).split(",")], survivor
    for node in range(4):
        assert [p.name for p in (root / f"n{node}" / "nvme").iterdir() if not p.name.startswith(".")] \
            == ["000000000001"]
    with CheckpointManager(tiers(str(root))) as manager:
        state = manager.restore()
    assert _check(state, 1) == {"w": True, "b": True, "rep": True, "step": True}


def test_a_full_disk_on_one_node_fails_the_save_on_every_rank(tmp_path: Path) -> None:
    root = tmp_path / "run"
    seen = values(run_ranks(8, f"{HERE}.failing_save_job", tmp_path / "out", str(root), "full"))
    for s in seen:
        assert "No space left on device" in s["step2"] and "rank 4" in s["step2"], s
        assert s["steps"]["shared"] == [1]
    for node in range(4):
        assert sorted(p.name for p in (root / f"n{node}" / "nvme").iterdir() if not p.name.startswith(".")) \
            == ["000000000001"]
    assert _check(CheckpointManager(tiers(str(root))).restore(), 1)["w"]


def retention_job(rank: int, world: int, root: str) -> dict[str, list[int]]:
    from trainio.checkpoint._save import bundle

    bundle.ROUND_BYTES = 2000  # replicas travel in several rounds
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    with CheckpointManager(tiers(root, keep_last=2), chunk_bytes=CHUNK) as manager:
        for step in range(1, 6):
            manager.save(step, sharded(step, world)).wait()
        manager.wait()
        return manager.steps()


def test_retention_on_every_node_keeps_the_newest_whole_steps(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for steps in values(run_ranks(8, f"{HERE}.retention_job", tmp_path / "out", str(root))):
        assert steps == {"nvme": [4, 5], "shared": [1, 2, 3, 4, 5]}
    for node in range(4):
        assert sorted(p.name for p in (root / f"n{node}" / "nvme").iterdir() if not p.name.startswith(".")) \
            == ["000000000004", "000000000005"]


def open_job(rank: int, world: int, root: str, save: int | None) -> dict[str, Any]:
    """Open a manager (the nodes settle their steps); optionally save ``save``; this node's steps."""
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    with CheckpointManager(tiers(root), chunk_bytes=CHUNK) as manager:
        if save is not None:
            manager.save(save, sharded(save, world)).wait()
        restored = manager.restore()["step"]
        return {"node": manager.steps()["nvme"], "restored": restored}


def _uncommit(root: Path, node: int, step: int) -> None:
    """Put a node's copy of ``step`` back the way a crash before its rename leaves it."""
    from trainio.checkpoint._tiers.node_tier import NODE_RECORD, NodeRecord

    directory = root / f"n{node}" / "nvme" / f"{step:012d}"
    record = NodeRecord.from_bytes((directory / NODE_RECORD).read_bytes(), "test", NODE_RECORD, step)
    directory.rename(directory.parent / record.run)


def test_nodes_that_disagree_are_settled_alike_at_the_next_start(saved: Path, tmp_path: Path) -> None:
    root = copy_of(saved, tmp_path)
    _uncommit(root, 2, 3)  # died between its record and its rename: rolled forward
    shutil.rmtree(root / "n3" / "nvme" / "000000000003")  # died before its record: filled at the next restore
    seen = values(run_ranks(8, f"{HERE}.open_job", tmp_path / "o1", str(root), None))
    assert [s["node"] for s in seen[::2]] == [[1, 2, 3]] * 4  # each node's first rank, after its write-back
    assert all(s["restored"] == 3 for s in seen)
    assert all((root / f"n{n}" / "nvme" / "000000000003" / "parts" / f"{2 * n:06d}.json").is_file() for n in range(4))
    # with nodes 2 and 3 lost, parts 4 and 5 are on no node (node 3 kept their replica) and no further tier has
    # step 3: it can never be restored, so every node drops it, and saving step 3 again starts clean
    for node in (2, 3):
        shutil.rmtree(root / f"n{node}" / "nvme" / "000000000003")
    shutil.rmtree(root / "shared" / "000000000003")
    seen = values(run_ranks(8, f"{HERE}.open_job", tmp_path / "o2", str(root), 3))
    assert all(s["restored"] == 3 for s in seen)
    assert all((root / f"n{n}" / "nvme" / "000000000003").is_dir() for n in range(4))


def _flip(path: Path, offset: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_record_or_a_file_a_peer_sends_is_caught(saved: Path, tmp_path: Path) -> None:
    from trainio.checkpoint._save.bundle import bundle, unbundle
    from trainio.checkpoint._tiers.node_tier import NODE_RECORD, NodeRecord
    from trainio.storage import CheckpointError, FormatError, digest

    record = saved / "n0" / "nvme" / "000000000003" / NODE_RECORD
    data = bytearray(record.read_bytes())
    for offset in range(0, len(data), 7):
        flipped = bytearray(data)
        flipped[offset] ^= 0x04
        with pytest.raises(FormatError):
            NodeRecord.from_bytes(bytes(flipped), "test", NODE_RECORD, 3)
    message = bytearray(bundle({"a": (FileEntry(3, digest(b"abc")), b"abc")}))
    message[-1] ^= 1
    with pytest.raises(CheckpointError, match="arrived damaged"):
        unbundle(bytes(message), "rank 5")

    root = copy_of(saved, tmp_path)
    _flip(root / "n3" / "nvme" / "000000000003" / NODE_RECORD)  # node 3's copy is not believed: from replicas
    shutil.rmtree(root / "n1")  # ranks 2 and 3 ask node 2 for their part's replica ...
    _flip(root / "n2" / "nvme" / "000000000003" / "state.zarr" / "w" / "c.2.0")  # ... which is damaged there
    results = values(run_ranks(8, f"{HERE}.restore_job", tmp_path / "o", str(root), 2, None))
    all_equal(results)
    assert results[2]["tiers"].get("shared", 0) > 0  # the damaged chunk came from the shared tier
    assert results[6]["peers"] > 0 and results[7]["peers"] > 0


def promote_job(rank: int, world: int, root: str) -> list[int]:
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    with CheckpointManager(tiers(root)) as manager:
        manager.promote()
        return manager.steps()["shared"]


def test_a_lost_nodes_part_is_promoted_from_its_replica(saved: Path, tmp_path: Path) -> None:
    root = copy_of(saved, tmp_path)
    shutil.rmtree(root / "shared" / "000000000003")  # not promoted yet when node 1 was lost
    shutil.rmtree(root / "n1")
    assert values(run_ranks(8, f"{HERE}.promote_job", tmp_path / "o", str(root)))[0] == [1, 2, 3]
    assert _check(CheckpointManager([Tier(root / "shared")]).restore(), 3) == \
        {"w": True, "b": True, "rep": True, "step": True}


def test_verify_checks_what_a_node_directory_holds(saved: Path, tmp_path: Path) -> None:
    from trainio.checkpoint import verify_checkpoint

    root = copy_of(saved, tmp_path)
    node = root / "n1" / "nvme"
    report = verify_checkpoint(node, [3])
    # ranks 0-3's part manifests, their chunks of w and their packs (b's small shards: a chunk and a zarr.json), rep's
    # one chunk (its owner is among them), the root's 4 (b, ranked, has no zarr.json; the packs' group has)
    assert report.problems == [] and report.files == 4 + 4 * 3 + 1 + 4
    _flip(node / "000000000003" / "state.zarr" / "w" / "c.2.0")
    assert [key for _, key, _ in verify_checkpoint(node, [3]).problems] == ["state.zarr/w/c.2.0"]
