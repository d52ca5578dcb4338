"""README's main command works: the local stack transcribes its spoken sample end to end."""

from __future__ import annotations

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
