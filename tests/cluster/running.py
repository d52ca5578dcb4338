"""`ifw local --serve` as a user starts it, seen from outside: its processes (found by a marker in
their environment, which each one inherits), its logs, and the check that nothing of it is left."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
MARKER = "IFW_TEST_LOCAL_STACK_MARKER"


class Started:
    def __init__(self, process: subprocess.Popen, marker: str, out: Path, err: Path, gateway: str):
        self.process, self.marker, self.out, self.err, self.gateway = process, marker, out, err, gateway

    def logs(self) -> str:
        return f"--- stdout\n{self.out.read_text()[-3000:]}\n--- stderr\n{self.err.read_text()[-5000:]}"


def start_local(tmp_path: Path, *extra: str) -> Started:
    """`ifw local --serve` with tiny.en, as a user starts it; returns once it says where the gateway is."""
    marker = uuid.uuid4().hex
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("ifw")), "local", "--serve", "--model", "tiny.en", *extra],
            cwd=REPO, env={**os.environ, MARKER: marker}, stdout=stdout, stderr=stderr,
        )

    def gateway() -> str | None:
        if process.poll() is not None:
            raise AssertionError(f"ifw local exited with {process.returncode}\n{err.read_text()[-5000:]}")
        found = re.search(r"^gateway: (\S+)", out.read_text(), re.MULTILINE)
        return found.group(1) if found else None

    try:
        return Started(process, marker, out, err, wait_for(gateway, 300, "ifw local to serve", interval=0.5))
    except BaseException:
        process.kill()
        process.wait()
        raise


def marked(marker: str) -> dict[int, str]:
    """Live processes (not zombies) whose environment holds the marker: pid -> command line."""
    needle = f"{MARKER}={marker}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def child_pid(stack: Started, module: str) -> int | None:
    """The pid of the child that runs `python -m <module>`."""
    return next((pid for pid, cmd in marked(stack.marker).items() if f" -m {module}" in cmd), None)


def ends_with_nothing_left(stack: Started, timeout: float = 90) -> None:
    try:
        wait_for(lambda: not marked(stack.marker), timeout, "every process of the stack to end", interval=0.5)
    except AssertionError:
        left = marked(stack.marker)
        for pid in left:  # the test's own clean-up: these are the stack's processes, by their marker
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"left running: {left}\n{stack.logs()}") from None
