"""When to save and what may be saved: an interval, SIGTERM (agreed on by every rank, within a grace period),
no silent step back in time, read-only managers, tiers that cannot be written refused up front."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from trainio.checkpoint import CheckpointManager, Tier
from trainio.storage import CheckpointError

from ._ranks import run_ranks, values


def _state(step: int) -> dict[str, Any]:
    return {"w": torch.full((64,), float(step)), "step": step}


def test_should_save_at_every_interval(tmp_path: Path) -> None:
    with CheckpointManager([tmp_path], save_interval_steps=25) as manager:
        assert [s for s in range(101) if manager.should_save(s)] == [0, 25, 50, 75, 100]
        assert not manager.preempted


def test_an_older_step_is_refused_unless_it_is_a_rollback(tmp_path: Path) -> None:
    with CheckpointManager([tmp_path]) as manager:
        manager.save(10, _state(10)).wait()
        with pytest.raises(CheckpointError, match="step 5 is older than step 10.*rollback=True"):
            manager.save(5, _state(5))
        manager.save(5, _state(5), rollback=True).wait()
        manager.save(7, _state(7)).wait()
    with CheckpointManager([tmp_path]) as manager:  # a new job sees what is on the tier
        with pytest.raises(CheckpointError, match="older than step 10"):
            manager.save(8, _state(8))
        assert manager.restore(7)["step"] == 7


def test_a_tier_that_cannot_be_written_is_refused_when_the_manager_is_made(tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where the tier's directory would go")
    with pytest.raises(CheckpointError, match="cannot be written.*read_only=True"):
        CheckpointManager([Tier(tmp_path / "fast"), Tier(tmp_path / "blocked" / "ckpt", name="slow")])
    with CheckpointManager([tmp_path / "fast"]) as writer:
        writer.save(3, _state(3)).wait()
    with CheckpointManager([Tier(tmp_path / "fast"), Tier(tmp_path / "blocked" / "ckpt", name="slow")],
                           read_only=True) as reader:
        assert reader.restore()["step"] == 3
        with pytest.raises(CheckpointError, match="read-only"):
            reader.save(4, _state(4))
        with pytest.raises(CheckpointError, match="read-only"):
            reader.promote()


TRAINER = textwrap.dedent("""
    import sys, time, torch
    from trainio.checkpoint import CheckpointManager
    manager = CheckpointManager([sys.argv[1]], save_on_preemption=True, preemption_grace_s=float(sys.argv[2]),
                                save_interval_steps=1000)
    print("ready", flush=True)
    for step in range(1, 100_000):
        time.sleep(0.01)
        if sys.argv[3] == "obeys" and manager.should_save(step):
            manager.save(step, {"w": torch.full((64,), float(step)), "step": step})
        if manager.preempted:
            break
    manager.close()
    print(f"saved {step}", flush=True)
""")


def _trainer(tmp_path: Path, grace: float, mode: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", TRAINER, str(tmp_path / "ckpt"), str(grace), mode],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def _terminated(process: subprocess.Popen[str]) -> tuple[str, str]:
    """Send SIGTERM, and what the process printed until it ended (killed if it has not within a minute)."""
    os.kill(process.pid, signal.SIGTERM)
    try:
        return process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_saves_at_the_next_step_and_the_job_leaves_cleanly(tmp_path: Path) -> None:
    process = _trainer(tmp_path, 30.0, "obeys")
    out, err = _terminated(process)
    assert process.returncode == 0, err
    saved = int(out.split()[-1])
    with CheckpointManager([tmp_path / "ckpt"], read_only=True) as manager:
        assert manager.steps() == {str(tmp_path / "ckpt"): [saved]} and manager.restore()["step"] == saved


def test_a_job_that_does_not_save_in_its_grace_period_ends_as_sigterm_ends_it(tmp_path: Path) -> None:
    process = _trainer(tmp_path, 0.5, "ignores")
    _terminated(process)
    assert process.returncode == -signal.SIGTERM


def preempt_one_rank(rank: int, world: int, root: str) -> int:
    """Rank 1 alone gets SIGTERM at step 3; every rank must agree to save then."""
    manager = CheckpointManager([root], save_on_preemption=True)
    step = 0
    for step in range(50):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        if manager.should_save(step):
            manager.save(step, {"w": torch.full((8,), float(step)), "step": step})
        if manager.preempted:
            break
    manager.close()
    return step


@pytest.mark.slow
def test_the_ranks_agree_on_the_step_to_save_when_one_is_preempted(tmp_path: Path) -> None:
    steps = values(run_ranks(2, "tests.checkpoint.test_policy.preempt_one_rank", tmp_path / "out",
                             str(tmp_path / "ckpt")))
    assert steps == [3, 3]
    with CheckpointManager([tmp_path / "ckpt"], read_only=True) as manager:
        assert manager.restore()["step"] == 3


def test_restoring_into_another_dtype_is_refused_unless_asked(tmp_path: Path) -> None:
    import numpy as np

    with CheckpointManager([tmp_path]) as manager:
        manager.save(1, {"w": torch.arange(6, dtype=torch.float32) / 3, "a": np.arange(4, dtype=np.float64)}).wait()
        target = {"w": torch.zeros(6, dtype=torch.bfloat16), "a": np.zeros(4, dtype=np.float64)}
        with pytest.raises(CheckpointError, match=r"w: the checkpoint holds float32, the target is bfloat16.*cast=True"):
            manager.restore(into=target)
        with pytest.raises(CheckpointError, match=r"a: the checkpoint holds float64, the target is float32"):
            manager.restore(into={"w": torch.zeros(6), "a": np.zeros(4, dtype=np.float32)})
        manager.restore(into=target, cast=True)
        assert torch.equal(target["w"], (torch.arange(6, dtype=torch.float32) / 3).bfloat16())


def test_closing_the_manager_gives_sigterm_back(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    manager = CheckpointManager([tmp_path], save_on_preemption=True)
    assert signal.getsignal(signal.SIGTERM) != before
    manager.close()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_tier_keeps_the_best_steps_by_a_metric_and_ls_shows_it(tmp_path: Path) -> None:
    losses = {10: 0.9, 20: 0.4, 30: 0.7, 40: 0.2, 50: 0.8, 60: 0.95}
    tiers = [Tier(tmp_path / "fast", keep_last=1), Tier(tmp_path / "best", keep_best=2, metric="val_loss")]
    with CheckpointManager(tiers) as manager:
        for step, loss in losses.items():
            manager.save(step, _state(step), metrics={"val_loss": loss, "tokens": step * 1000}).wait()
            manager.promote()
        assert manager.steps()[str(tmp_path / "best")] == [20, 40, 60]  # the two lowest losses, and the newest
        assert manager.steps()[str(tmp_path / "fast")] == [60]
        with pytest.raises(CheckpointError, match="finite numbers"):
            manager.save(70, _state(70), metrics={"val_loss": float("nan")})
    result = subprocess.run([str(Path(sys.executable).parent / "trainio"), "ckpt", "ls", str(tmp_path / "best")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "tokens=40000 val_loss=0.2" in result.stdout
    with pytest.raises(ValueError, match="keep_best and metric go together"):
        Tier(tmp_path / "x", keep_best=2)


def test_a_flipped_bit_in_a_steps_metrics_is_refused(tmp_path: Path) -> None:
    from trainio.checkpoint import list_steps, read_manifest
    from trainio.storage import FormatError

    with CheckpointManager([tmp_path]) as manager:
        manager.save(5, _state(5), metrics={"val_loss": 0.25}).wait()
    assert read_manifest(tmp_path, 5).metrics == {"val_loss": 0.25}
    path = next(tmp_path.rglob("manifest.json"))
    data = bytearray(path.read_bytes())
    at = bytes(data).index(b"0.25")
    data[at + 2] ^= 0x01  # 0.25 -> 0.35: still a number, no longer what was saved
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError):
        read_manifest(tmp_path, 5)
    assert list_steps(tmp_path)[0].error and not list_steps(tmp_path)[0].metrics
