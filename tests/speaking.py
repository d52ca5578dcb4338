"""Speech made at test time with espeak-ng: the one helper the suites share."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def speak(text: str, path: Path, *, voice: str = "en-us", rate: int = 140) -> Path:
    """`text` spoken into the WAV file `path` (espeak-ng's 22.05 kHz mono); a missing tool fails the test."""
    if not shutil.which("espeak-ng"):
        pytest.fail("espeak-ng is needed: apt-get install espeak-ng (make setup installs it)")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(path), text], check=True)
    return path
