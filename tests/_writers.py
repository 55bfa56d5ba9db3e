"""A dataset writer process killed midway, for crash tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from trainio.loaders import DatasetWriter
    writer = DatasetWriter(sys.argv[1], shard_bytes=1 << 15)
    for i in range(10**9):
        writer.write({"id": i, "tokens": np.arange(256, dtype=np.int32)})
        if i == 2000:
            print("writing", flush=True)
""")


def kill_a_dataset_writer_midway(path: Path) -> None:
    """Run a DatasetWriter at ``path`` in a subprocess and SIGKILL it after it has finished some shards."""
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"writing"
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()
