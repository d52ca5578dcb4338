"""README's main command works: the local stack transcribes its spoken sample end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jiwer
import pytest

from ifw.local.stack import SAMPLE_TEXT

pytestmark = [pytest.mark.cluster, pytest.mark.model]

REPO = Path(__file__).resolve().parents[2]


def test_local_stack_demo_transcribes_the_sample_through_rest():
    result = subprocess.run(
        [str(Path(sys.executable).with_name("ifw")), "local"],  # exactly what `make demo` runs
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "-> HTTP 200" in out and '"status": "completed"' in out
    heard = re.sub(r"[^a-z' ]", "", re.findall(r'"text": "([^"]*)"', out)[0].lower())
    for word in ("fast", "kubernetes", "transcription", "resource", "apply", "delete"):
        assert word in heard, heard
    # kubectl shows the finished job with its columns filled in by operator and runner.
    row = next(line for line in out.splitlines() if "Succeeded" in line)
    assert " en " in row and " base " in row
    assert jiwer.wer(re.sub(r"[^a-z' ]", "", SAMPLE_TEXT.lower()), heard) <= 0.25, heard


def test_a_pool_worker_slower_than_ready_timeout_stops_the_stack_and_says_what_to_raise():
    # base takes seconds to load here, so half a second is too short: the stack must give up with a
    # message naming the flag, and leave no process behind.
    result = subprocess.run(
        [str(Path(sys.executable).with_name("ifw")), "local", "--ready-timeout", "0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "pool worker not ready" in result.stderr and "within 0.5s" in result.stderr, result.stderr[-2000:]
    assert "--ready-timeout" in result.stderr
    logs = re.search(r"logs kept in (\S+)", result.stderr).group(1)
    assert not _processes_in(logs), "processes of the failed stack still running"


def _processes_in(directory: str) -> list[str]:
    """PIDs whose working directory is under `directory` (the stack starts each process there)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "cwd").startswith(directory):
                found.append(proc.name)
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found
