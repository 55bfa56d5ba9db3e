"""Checkpoint tiers on a real S3 server (SeaweedFS): upload, create-only commit, promotion, outages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.checkpoint import CheckpointManager, Tier
from trainio.checkpoint._tiers import open_tier_io
from trainio.storage import CheckpointError, RetryPolicy, S3Options, S3Store, ZarrStore

from ..storage._faulty_proxy import Fault, FaultyProxy
from .test_format import zarr_read

torch = pytest.importorskip("torch")


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(700, 1000, generator=g), "b": torch.randn(33, generator=g).bfloat16(),
            "meta": {"step": seed, "name": "run"}}


def test_s3_as_the_first_tier(s3_store: S3Store) -> None:
    with CheckpointManager([Tier(s3_store, keep_last=2)], chunk_bytes=1 << 20) as manager:
        state = _state(1)
        manager.save(1, state).wait()
        state["b"] += 1
        manager.save(2, state).wait()
        manager.save(3, _state(3))
        manager.wait()  # retention follows the commit
        assert manager.steps() == {s3_store.url: [2, 3]}
        restored = manager.restore(2)
    assert torch.equal(restored["w"], state["w"]) and torch.equal(restored["b"], state["b"])
    assert restored["meta"] == {"step": 1, "name": "run"}
    # 700 rows of 4000 bytes in 1 MiB chunks: the edge chunk is stored full size, as zarr expects.
    assert s3_store.size("000000000002/state.zarr/w/c.2.0") == 262 * 4000


def test_plain_zarr_reads_a_step_on_s3(s3_store: S3Store, tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    state = _state(5)
    with CheckpointManager([Tier(tmp_path), Tier(s3_store)], chunk_bytes=1 << 20) as manager:
        manager.save(5, state).wait()
        manager.wait()
    group = zarr.open_group(ZarrStore(s3_store, "000000000005/state.zarr", read_only=True), mode="r")
    assert np.array_equal(zarr_read(group, "w"), state["w"].numpy())
    assert np.array_equal(zarr_read(group, "b"), state["b"].view(torch.uint16).numpy())


def test_restore_falls_back_to_s3(s3_store: S3Store, tmp_path: Path) -> None:
    state = _state(4)
    with CheckpointManager([Tier(tmp_path), Tier(s3_store)]) as manager:
        manager.save(4, state).wait()
        manager.wait()
        chunk = tmp_path / "000000000004" / "state.zarr" / "w" / "c.0.0"
        with open(chunk, "r+b") as f:
            f.seek(12345)
            f.write(b"\xff")
        restored, report = manager.restore_with_report(repair=True)
        assert torch.equal(restored["w"], state["w"])
        assert report.repaired
        assert manager.restore(tiers=[s3_store.url])["meta"]["step"] == 4


def test_two_writers_cannot_both_commit_a_step(s3_store: S3Store) -> None:
    from trainio.checkpoint._format.manifest import Manifest
    from trainio.checkpoint._format.state_tree import flatten
    from trainio.checkpoint._save.plan import describe_leaves, make_plan

    io = open_tier_io(s3_store, "s3")
    first, second = io.writer(9), io.writer(9)  # both started before either committed
    skeleton, leaves = flatten({"x": torch.ones(3)})
    plan = make_plan([describe_leaves(leaves)], 64 << 20, 1 << 20, None)
    manifest = Manifest(9, skeleton, plan.arrays, pack=plan.pack).to_bytes()
    first.commit(manifest, {})
    with pytest.raises(CheckpointError, match="committed by another writer"):
        second.commit(manifest, {})
    second.abort()  # must not delete the committed step
    assert io.steps() == [9]


@pytest.fixture
def outage(s3_options: S3Options, s3_bucket: str, seaweedfs: Any) -> Iterator[tuple[FaultyProxy, S3Store]]:
    """An S3 store behind a proxy that the test can make fail every request."""
    with FaultyProxy(seaweedfs.endpoint, faults=(Fault.SLOW_DOWN,)) as proxy:
        options = replace(s3_options, endpoint_url=proxy.endpoint,
                          retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02))
        store = S3Store(s3_bucket, "ckpt", options=options)
        yield proxy, store
        store.close()


@pytest.mark.slow
def test_s3_down_during_promotion(tmp_path: Path, outage: tuple[FaultyProxy, S3Store]) -> None:
    proxy, store = outage
    tiers = [Tier(tmp_path, keep_last=1, name="local"), Tier(store, name="s3")]
    with CheckpointManager(tiers, promote_attempts=2, retry_backoff_s=0.01) as manager:
        manager.save(1, _state(1)).wait()
        manager.wait()
        proxy.configure(fault_rate=1.0)  # the server is down
        handle = manager.save(2, _state(2))
        handle.wait()  # the local tier is unaffected
        results = handle.result()
        assert results["local"].status == "committed"
        assert results["s3"].status == "failed" and "503" in results["s3"].error  # the server answers 503
        with pytest.raises(CheckpointError, match="promoting step 2 failed after 2 tries"):
            manager.wait()
        manager.save(3, _state(3)).wait()
        manager._promotions.wait()
        local = sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit())
        # 1: the last step verified (by its promotion); 2: waiting for S3; 3: the newest.
        assert local == [1, 2, 3]
        proxy.configure(fault_rate=0.0)  # back up
        manager.promote()
        assert manager.steps() == {"local": [3], "s3": [1, 2, 3]}
        assert torch.equal(manager.restore(2, tiers=["s3"])["w"], _state(2)["w"])


def test_s3_down_before_the_first_save_never_stops_a_save(tmp_path: Path, outage: tuple[FaultyProxy, S3Store]) -> None:
    """The slower tier's lease is taken by the promotion into it, so an outage there only delays the promotion."""
    proxy, store = outage
    proxy.configure(fault_rate=1.0)
    tiers = [Tier(tmp_path, name="local"), Tier(store, name="s3")]
    with CheckpointManager(tiers, promote_attempts=1, retry_backoff_s=0.01) as manager:
        handle = manager.save(1, _state(1))
        handle.wait()
        assert handle.result()["local"].status == "committed"
        with pytest.raises(CheckpointError, match="promoting step 1 failed"):
            manager.wait()
        proxy.configure(fault_rate=0.0)
        manager.promote()
        assert manager.steps() == {"local": [1], "s3": [1]}
