"""CheckpointManager on local tiers: async saves, retention, promotion, verified restore."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainio.checkpoint import CheckpointManager, Tier
from trainio.storage import CheckpointError
from trainio.tools._bench_limits import drop_from_page_cache

torch = pytest.importorskip("torch")


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(512, 256, generator=g), "b": torch.randn(128, generator=g).bfloat16()},
            "step": seed, "rng": np.arange(5) + seed}


def _chunk(root: Path, step: int, path: str = "model/w") -> Path:
    return root / f"{step:012d}" / "state.zarr" / path / "c.0.0"


def test_save_returns_a_handle_and_restore_gets_the_newest(tmp_path: Path) -> None:
    with CheckpointManager([tmp_path]) as manager:
        handles = [manager.save(step, _state(step)) for step in (10, 20, 30)]
        for handle in handles:
            handle.wait()
            assert handle.done()
            assert handle.result()[str(tmp_path)].status == "committed"
        assert manager.steps() == {str(tmp_path): [10, 20, 30]}
        assert manager.latest() == 30
        restored = manager.restore()
        assert restored["step"] == 30
        assert torch.equal(restored["model"]["w"], _state(30)["model"]["w"])
        assert manager.restore(20)["step"] == 20


def test_the_caller_may_change_its_tensors_once_save_returns(tmp_path: Path) -> None:
    state = _state()
    expected = state["model"]["w"].clone()
    with CheckpointManager([tmp_path]) as manager:
        handle = manager.save(1, state)
        state["model"]["w"].add_(1.0)  # the training loop moves on at once
        handle.wait()
        assert torch.equal(manager.restore()["model"]["w"], expected)


def test_staging_memory_is_reused_not_grown(tmp_path: Path) -> None:
    with CheckpointManager([tmp_path], max_pending=2) as manager:
        for step in range(6):
            manager.save(step, _state(step))
        manager.wait()
        slots = list(manager._staging._free)
        capacities = [s.capacity for s in slots]
        arrays = [id(s.array) for s in slots]
        for step in range(6, 12):
            manager.save(step, _state(step))
        manager.wait()
        assert len(manager._staging._free) == 2
        assert sorted(s.capacity for s in manager._staging._free) == sorted(capacities)
        assert sorted(id(s.array) for s in manager._staging._free) == sorted(arrays)


def test_staging_reserved_ahead_is_what_the_first_save_copies_into(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    state = _state()
    with CheckpointManager([tmp_path], max_pending=2) as manager:
        with caplog.at_level("INFO", logger="trainio.checkpoint._save.staging"):
            manager.reserve_staging(state)
        assert caplog.text.count("allocated") == 2, "every slot a pending save may take"
        arrays = sorted(id(s.array) for s in manager._staging._free)
        assert all(s.capacity >= 512 * 256 * 4 + 128 * 2 for s in manager._staging._free)
        caplog.clear()
        with caplog.at_level("INFO", logger="trainio.checkpoint._save.staging"):
            manager.save(1, state).wait()
            manager.save(2, _state(2)).wait()
        assert "allocated" not in caplog.text, "the saves copied into the reserved memory"
        assert sorted(id(s.array) for s in manager._staging._free) == arrays
        with pytest.raises(CheckpointError, match="state: must be a dict"):
            manager.reserve_staging(42)
    assert torch.equal(CheckpointManager([tmp_path]).restore(1)["model"]["w"], state["model"]["w"])


def test_a_promotion_pass_settles_only_the_steps_it_saw() -> None:
    from trainio.checkpoint._handle import SaveLedger, TierResult

    ledger = SaveLedger(["fast", "slow"])
    seen, committed_meanwhile = ledger.open(1), ledger.open(2)
    for handle in (seen, committed_meanwhile):
        ledger.record(handle, "fast", TierResult("committed"))
    ledger.settle_tier("slow", "skipped", up_to=1)  # a pass that listed the tiers before step 2 was committed
    assert seen.tier_status("slow") == "skipped"
    assert committed_meanwhile.tier_status("slow") == "pending", "step 2 waits for the pass that sees it"
    ledger.record(committed_meanwhile, "slow", TierResult("committed"))
    assert committed_meanwhile.result(timeout=1)["slow"].status == "committed"


def test_back_pressure_holds_the_next_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainio.checkpoint._save.protocol import StepSaves

    release = threading.Event()
    real = StepSaves.write

    def slow(*args: Any, **kwargs: Any) -> Any:
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(StepSaves, "write", slow)
    with CheckpointManager([tmp_path], max_pending=1) as manager:
        first = manager.save(1, _state(1))
        second_done = threading.Event()

        def second() -> None:
            manager.save(2, _state(2))
            second_done.set()

        thread = threading.Thread(target=second)
        thread.start()
        assert not second_done.wait(0.3)  # waits for the first save's staging slot
        assert not first.done()
        release.set()
        thread.join(10)
        assert second_done.is_set()
        manager.wait()
        assert manager.steps()[str(tmp_path)] == [1, 2]


def test_synchronous_save_commits_before_returning(tmp_path: Path) -> None:
    with CheckpointManager([tmp_path], async_save=False) as manager:
        handle = manager.save(5, _state())
        assert handle.done()
        assert manager.steps()[str(tmp_path)] == [5]


def test_a_step_is_never_overwritten(tmp_path: Path) -> None:
    with CheckpointManager([tmp_path]) as manager:
        manager.save(1, _state(1)).wait()
        handle = manager.save(1, _state(2))
        with pytest.raises(CheckpointError, match="already committed"):
            handle.wait()
        assert manager.restore(1)["step"] == 1
        manager.save(2, _state(2)).wait()  # the failure was reported by wait(): saving goes on


def test_a_failed_save_raises_from_the_next_save_when_nobody_waited(tmp_path: Path) -> None:
    with CheckpointManager([tmp_path]) as manager:
        manager.save(1, _state(1)).wait()
        manager.save(1, _state(1))
        manager._saver.submit(lambda: None).result()
        with pytest.raises(CheckpointError, match="saving step 1 failed"):
            manager.save(2, _state(2))
        manager.save(2, _state(2)).wait()


def test_retention_keep_last_and_keep_every(tmp_path: Path) -> None:
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    with CheckpointManager([Tier(fast, keep_last=2), Tier(slow, keep_last=1, keep_every=20)]) as manager:
        for step in range(0, 70, 10):
            manager.save(step, _state(step))
        manager.wait()
        steps = manager.steps()
    assert steps[str(fast)] == [50, 60]
    assert steps[str(slow)] == [0, 20, 40, 60]
    assert not [p for p in os.listdir(fast) if not p.isdigit() and p != "last_known_good.json"]


def test_retention_never_deletes_the_last_known_good_step(tmp_path: Path) -> None:
    with CheckpointManager([Tier(tmp_path, keep_last=1)]) as manager:
        manager.save(1, _state(1)).wait()
        manager.restore(1)  # a full, verified restore marks step 1 known good
        for step in (2, 3, 4):
            manager.save(step, _state(step))
        manager.wait()
        assert manager.steps()[str(tmp_path)] == [1, 4]
        manager.restore(4)
        manager.save(5, _state(5))
        manager.wait()
        assert manager.steps()[str(tmp_path)] == [4, 5]


def test_retention_spares_a_step_being_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainio.checkpoint._restore import step_reader as _read

    with CheckpointManager([Tier(tmp_path, keep_last=1)]) as manager:
        manager.save(1, _state(1)).wait()
        in_restore, go_on = threading.Event(), threading.Event()
        real = _read.StepReader.read_file

        def slow_read(self: Any, *args: Any) -> None:
            in_restore.set()
            go_on.wait(10)
            real(self, *args)

        monkeypatch.setattr(_read.StepReader, "read_file", slow_read)
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.update(state=manager.restore(1)))
        thread.start()
        assert in_restore.wait(10)
        monkeypatch.setattr(_read.StepReader, "read_file", real)
        manager.save(2, _state(2))
        manager.wait()
        assert manager.steps()[str(tmp_path)] == [1, 2]  # step 1 is being read: kept
        go_on.set()
        thread.join(10)
        assert result["state"]["step"] == 1


def test_promotion_copies_to_every_tier_that_keeps_the_step(tmp_path: Path) -> None:
    tiers = [Tier(tmp_path / "nvme", keep_last=1, name="nvme"), Tier(tmp_path / "pfs", keep_last=3, name="pfs"),
             Tier(tmp_path / "archive", keep_every=100, name="archive")]
    with CheckpointManager(tiers) as manager:
        handles = [manager.save(step, _state(step)) for step in (100, 150, 200, 250)]
        manager.wait()
        results = [h.result() for h in handles]
        assert manager.steps() == {"nvme": [250], "pfs": [150, 200, 250], "archive": [100, 200]}
    assert results[1]["archive"].status == "skipped"
    assert results[2]["archive"].status == "committed"
    assert all(r["nvme"].status == "committed" and r["pfs"].status == "committed" for r in results)
    with CheckpointManager([Tier(tmp_path / "archive")]) as reader:
        assert reader.restore(200)["step"] == 200


def test_unchanged_tensors_are_linked_not_rewritten(tmp_path: Path) -> None:
    state = _state()
    with CheckpointManager([tmp_path]) as manager:
        manager.save(1, state).wait()
        state["model"]["b"] += 1
        manager.save(2, state).wait()
        restored = manager.restore(2)
    assert os.stat(_chunk(tmp_path, 1)).st_ino == os.stat(_chunk(tmp_path, 2)).st_ino
    # b is small: it lives in the pack, which changed with it.
    assert os.stat(_chunk(tmp_path, 1, ".packed").with_name("c.0")).st_ino != os.stat(
        _chunk(tmp_path, 2, ".packed").with_name("c.0")).st_ino
    assert torch.equal(restored["model"]["b"], state["model"]["b"])
    import shutil

    shutil.rmtree(tmp_path / f"{1:012d}")  # every step stands alone
    with CheckpointManager([tmp_path]) as manager:
        assert torch.equal(manager.restore(2)["model"]["w"], state["model"]["w"])


def _flip_byte(path: Path, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_flipped_byte_falls_back_to_the_next_tier_and_repairs(tmp_path: Path) -> None:
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    state = _state(3)
    with CheckpointManager([Tier(fast), Tier(slow)]) as manager:
        manager.save(3, state).wait()
        manager.wait()
        _flip_byte(_chunk(fast, 3))
        restored, report = manager.restore_with_report()
        assert torch.equal(restored["model"]["w"], state["model"]["w"])
        assert any("c.0.0" in k and "xxh3-128" in v for k, v in report.fell_back.items())
        assert not report.repaired
        restored, report = manager.restore_with_report(repair=True)
        assert report.repaired == [f"{fast}:state.zarr/model/w/c.0.0"]
        _, report = manager.restore_with_report(tiers=[str(fast)])
        assert not report.fell_back


def test_a_missing_file_falls_back_and_damage_everywhere_is_an_error(tmp_path: Path) -> None:
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    with CheckpointManager([Tier(fast), Tier(slow)]) as manager:
        manager.save(3, _state(3)).wait()
        manager.wait()
        _chunk(fast, 3).unlink()
        assert manager.restore()["step"] == 3
        _flip_byte(_chunk(slow, 3))
        with pytest.raises(CheckpointError, match=r"model/w/c\.0\.0.*damaged or missing on every tier"):
            manager.restore()
        with pytest.raises(CheckpointError):
            manager.restore(tiers=[str(fast)])


def test_a_truncated_file_is_detected(tmp_path: Path) -> None:
    with CheckpointManager([tmp_path]) as manager:
        manager.save(3, _state(3)).wait()
        os.truncate(_chunk(tmp_path, 3), 1000)
        with pytest.raises(CheckpointError, match="1000 bytes"):
            manager.restore()


def _evict(root: Path) -> None:
    """Drop every file under ``root`` from the page cache, as after a restart on a new node."""
    drop_from_page_cache([path for path in root.rglob("*") if path.is_file()])


def test_files_not_in_the_page_cache_are_read_in_pieces_and_checked(tmp_path: Path) -> None:
    """A chunk of several read pieces, not in the page cache, comes back whole, and a flipped byte is still found."""
    g = torch.Generator().manual_seed(5)
    state = {"w": torch.randn(1024, 1024 + 7, generator=g), "b": torch.randn(64, generator=g)}  # 4 MiB and more
    with CheckpointManager([tmp_path]) as manager:
        manager.save(1, state).wait()
        _evict(tmp_path)
        target = {"w": torch.zeros_like(state["w"]), "b": torch.zeros_like(state["b"])}
        manager.restore(into=target)
        assert torch.equal(target["w"], state["w"]) and torch.equal(target["b"], state["b"])
        _flip_byte(_chunk(tmp_path, 1, "w"))
        _evict(tmp_path)
        with pytest.raises(CheckpointError, match=r"w/c\.0\.0.*damaged or missing on every tier"):
            manager.restore(into=target)


def test_a_restore_asks_the_disk_for_its_small_files_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files the kernel reads in one request (smaller than ADVISE_BELOW) are announced to the tier before the
    reads start; bigger ones are left to the read-ahead of their own reads."""
    from trainio.checkpoint._tiers.local import LocalTierIO

    advised: list[list[str]] = []
    monkeypatch.setattr(LocalTierIO, "advise", lambda self, step, keys: advised.append(sorted(keys)))
    g = torch.Generator().manual_seed(5)
    state = {"big": torch.randn(2 << 20, generator=g), "batched": torch.randn(400_000, generator=g),
             "mid": torch.randn(100_000, generator=g), "small": torch.randn(64, generator=g)}
    # 8 MiB (its own read), 1.6 MB (batched, not advised), 400 KB (batched and advised), 256 bytes (the pack)
    with CheckpointManager([tmp_path]) as manager:
        manager.save(1, state).wait()
        restored = manager.restore(1)
    assert all(torch.equal(restored[k], state[k]) for k in state)
    assert len(advised) == 1 and advised[0] == ["state.zarr/.packed/c.0", "state.zarr/mid/c.0"]


def test_partial_restore_of_a_sub_tree(tmp_path: Path) -> None:
    state = {"model": {"a": torch.ones(3), "b": {"c": torch.zeros(2)}}, "optim": {"lr": 0.1}, "step": 4}
    with CheckpointManager([tmp_path]) as manager:
        manager.save(4, state).wait()
        assert list(manager.restore(keys=["model"])) == ["model"]
        part = manager.restore(keys=["model/b", "step"])
        assert list(part) == ["model", "step"] and list(part["model"]) == ["b"]
        with pytest.raises(CheckpointError, match="not in the checkpoint"):
            manager.restore(keys=["nope"])


def test_restore_into_fills_tensors_in_place(tmp_path: Path) -> None:
    state = _state(7)
    with CheckpointManager([tmp_path]) as manager:
        manager.save(7, state).wait()
        target = _state(0)
        w, b = target["model"]["w"], target["model"]["b"]
        manager.restore(into=target)
    assert target["model"]["w"] is w and target["model"]["b"] is b
    assert torch.equal(w, state["model"]["w"]) and torch.equal(b, state["model"]["b"])
    assert target["step"] == 7 and np.array_equal(target["rng"], state["rng"])


def test_restore_into_a_mismatched_target_names_the_array(tmp_path: Path) -> None:
    with CheckpointManager([tmp_path]) as manager:
        manager.save(7, _state(7)).wait()
        target = _state(0)
        target["model"]["w"] = torch.zeros(3, 3)
        with pytest.raises(CheckpointError, match=r"model/w.*\[512, 256\]"):
            manager.restore(into=target)


def test_modules_and_optimizers_round_trip_through_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=2)
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        optim.step()
        sched.step()
    with CheckpointManager([tmp_path]) as manager:
        manager.save(3, {"model": model, "optim": optim, "sched": sched, "step": 3}).wait()
        plain = manager.restore()
        assert set(plain["model"]) == set(model.state_dict())
        assert plain["optim"]["param_groups"][0]["lr"] == optim.param_groups[0]["lr"]

        model2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))
        optim2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
        sched2 = torch.optim.lr_scheduler.StepLR(optim2, step_size=5)
        weight = model2[0].weight
        target = {"model": model2, "optim": optim2, "sched": sched2, "step": 0}
        manager.restore(into=target)
    assert model2[0].weight is weight
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert optim2.state_dict()["param_groups"] == optim.state_dict()["param_groups"]
    for k, v in optim.state_dict()["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(optim2.state_dict()["state"][k][name]))
    assert sched2.state_dict() == sched.state_dict()
    assert target["step"] == 3


def test_config_and_tier_validation(tmp_path: Path) -> None:
    manager = CheckpointManager.from_config({"tiers": [{"url": str(tmp_path / "a"), "keep_last": 2},
                                                       str(tmp_path / "b")], "max_pending": 2})
    with manager:
        assert [t.keep_last for t in manager.tiers] == [2, None]
    with pytest.raises(ValueError, match="keep_last"):
        Tier(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="unknown tier setting"):
        CheckpointManager.from_config({"tiers": [{"url": str(tmp_path), "keep": 1}]})
    with pytest.raises(ValueError, match="must differ"):
        CheckpointManager([tmp_path, tmp_path])
    manager.close()
    with pytest.raises(CheckpointError, match="closed"):
        manager.save(1, {})


def test_restore_without_any_step_says_so(tmp_path: Path) -> None:
    with CheckpointManager([tmp_path]) as manager:
        with pytest.raises(CheckpointError, match="no committed step"):
            manager.restore()
        manager.save(1, _state()).wait()
        with pytest.raises(CheckpointError, match="step 2 is committed on none"):
            manager.restore(2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: GPU tensors are staged in pinned memory")
def test_gpu_tensors_go_through_pinned_staging(tmp_path: Path) -> None:
    state = {"w": torch.randn(1024, 1024, device="cuda"), "b": torch.randn(7, device="cuda").bfloat16()}
    expected = {k: v.cpu() for k, v in state.items()}
    with CheckpointManager([tmp_path]) as manager:
        handle = manager.save(1, state)
        state["w"].add_(1)  # after save returns, the GPU tensors are the caller's again
        handle.wait()
        assert all(slot.pinned for slot in manager._staging._free)
        target = {"w": torch.zeros(1024, 1024, device="cuda"), "b": torch.zeros(7, device="cuda").bfloat16()}
        manager.restore(into=target)
    assert target["w"].device.type == "cuda"
    assert torch.equal(target["w"].cpu(), expected["w"]) and torch.equal(target["b"].cpu(), expected["b"])


def test_tensors_filled_from_the_pack_on_their_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The path CUDA targets of packed arrays take (the pack copied to their device once, each filled from it),
    run here on CPU tensors: groups that hold only packed arrays among them."""
    from trainio.checkpoint._restore import step_reader

    monkeypatch.setattr(step_reader, "is_cuda_target", lambda spec, target: spec.packed is not None and
                        isinstance(target, torch.Tensor) and tuple(target.shape) == spec.shape)
    state = {"model": {"w": torch.randn(300, 300), "b": torch.randn(7).bfloat16()},
             "optim": {"step": torch.tensor(7.0), "lr": torch.tensor([3e-4], dtype=torch.float64)}, "step": 2}
    with CheckpointManager([tmp_path]) as manager:
        manager.save(2, state).wait()
        target = {"model": {"w": torch.zeros(300, 300), "b": torch.zeros(7).bfloat16()},
                  "optim": {"step": torch.tensor(0.0), "lr": torch.zeros(1, dtype=torch.float64)}, "step": 0}
        restored = manager.restore(into=target)
    assert restored["optim"]["step"] is target["optim"]["step"]
    for group in ("model", "optim"):
        for name, value in state[group].items():
            assert torch.equal(target[group][name], value), name


def test_compressed_arrays_for_device_targets_go_through_host_memory(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Targets taken for CUDA tensors (here CPU ones, as that path sees them) of compressed arrays are decoded in
    host memory and copied in: their files cannot be read straight into the tensor."""
    from trainio.checkpoint._restore import step_reader

    monkeypatch.setattr(step_reader, "is_cuda_target", lambda spec, target: isinstance(target, torch.Tensor))
    state = {"w": torch.randn(300, 300), "b": torch.randn(7)}
    with CheckpointManager([tmp_path], compression="zstd") as manager:
        manager.save(1, state).wait()
        target = {"w": torch.zeros(300, 300), "b": torch.zeros(7)}
        manager.restore(into=target)
    assert torch.equal(target["w"], state["w"]) and torch.equal(target["b"], state["b"])
