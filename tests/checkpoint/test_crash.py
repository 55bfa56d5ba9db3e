"""A writer SIGKILLed at random moments never costs a committed step.

Each trial starts a process that saves steps back to back (two tiers,
retention on), kills it with SIGKILL after a random delay, and checks that
a new manager restores the newest committed step bit for bit, that this step
is at least the last one the writer saw committed, and that leftovers are
never listed as steps and are cleaned up.

Run as a script for a longer stress run:
``python -m tests.checkpoint.test_crash --trials 300``.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trainio.checkpoint import CheckpointManager, Tier
from trainio.checkpoint._tiers.lease import CLOCK_PROBE, LEASE
from trainio.storage import TEMP_MARKER

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` is the quick lane; .ci/run runs everything

_WRITER = """
import sys
from trainio.checkpoint import CheckpointManager, Tier
from tests.checkpoint.test_crash import state_of
root = sys.argv[1]
tiers = [Tier(root + "/fast", keep_last=2), Tier(root + "/slow", keep_last=3)]
manager = CheckpointManager(tiers, chunk_bytes=1 << 18)
print("started", flush=True)
previous = None
for step in range(int(sys.argv[2]), 10**6):
    handle = manager.save(step, state_of(step))
    if previous is not None:
        previous.wait()
        print(previous.step, flush=True)
    previous = handle
"""


def state_of(step: int) -> dict[str, object]:
    """The state the writer saves at ``step``: several arrays, some unchanged from step to step."""
    rng = np.random.default_rng(step)
    return {
        "model": {f"layer{i}": rng.standard_normal((128, 256), dtype=np.float32) for i in range(6)},
        "frozen": np.arange(300_000, dtype=np.int64),
        "small": [np.full(7, step, np.int16) for _ in range(20)],
        "step": step,
    }


def _committed(stdout: bytes) -> int:
    lines = [line for line in stdout.decode().split() if line.isdigit()]
    return int(lines[-1]) if lines else -1


def run_trial(root: Path, rng: random.Random, first_step: int) -> tuple[int, int]:
    """One kill, a restore, one more save; returns (last step the writer saw committed, the step saved last)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path])}
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(first_step)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert writer.stdout is not None and writer.stdout.readline() == b"started\n", "the writer did not start"
    time.sleep(rng.uniform(0.0, 1.2))  # from the manager's start: the kill lands while it saves, not at import
    writer.send_signal(signal.SIGKILL)
    stdout, stderr = writer.communicate()
    assert writer.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    seen = _committed(stdout)
    for tier in ("fast", "slow"):
        listed = os.listdir(root / tier) if (root / tier).exists() else []
        assert all(name.isdigit() or name.startswith(TEMP_MARKER) or name == CLOCK_PROBE
                   or name in ("last_known_good.json", LEASE) for name in listed), listed
    tiers = [Tier(root / "fast"), Tier(root / "slow")]
    with CheckpointManager(tiers) as manager:  # a reader: it restores, and removes nobody's files
        latest = manager.latest()
        assert latest is not None or seen == -1
        if latest is not None:
            assert latest >= seen
            restored = manager.restore()
            expected = state_of(latest)
            assert restored["step"] == latest
            for name, array in expected["model"].items():  # type: ignore[attr-defined]
                assert np.array_equal(restored["model"][name], array), name
            assert np.array_equal(restored["frozen"], expected["frozen"])
            assert all(np.array_equal(a, b) for a, b in zip(restored["small"], expected["small"], strict=True))
    with CheckpointManager(tiers) as manager:  # the next writer takes over the dead one's leases and its debris
        latest = (-1 if latest is None else latest) + 1
        manager.save(latest, state_of(latest)).wait()
        manager.wait()
    leftovers = [n for t in ("fast", "slow") for n in os.listdir(root / t) if n.startswith(TEMP_MARKER)]
    assert not leftovers, f"debris of the dead writer was not removed: {leftovers}"
    return seen, latest


@pytest.mark.parametrize("seed", range(3))
def test_killed_writers_never_lose_a_committed_step(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    next_step = 0
    for _ in range(7):  # 21 kills in all, each resuming after the newest step
        _, latest = run_trial(tmp_path, rng, next_step)
        next_step = latest + 1


def main() -> None:
    """Stress: many more kills than the test suite runs."""
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        next_step = 0
        for trial in range(args.trials):
            seen, latest = run_trial(Path(tmp), rng, next_step)
            next_step = latest + 1
            print(f"trial {trial}: the killed writer saw {seen} committed; restored, then saved {latest}", flush=True)
    print(f"{args.trials} kills, no committed step lost")


if __name__ == "__main__":
    main()
