"""Benchmarks that cannot rot: each one in bench/ runs in its --quick form, as `make bench` runs
it (`python -m bench.X` from the repo root, its own process), must exit 0 and print its figures.

A benchmark that asserts a stale fixture, reads answers its own way or lost an argument fails
here, not on the day someone needs its numbers. The quick forms take seconds to about a minute
each on 2 cores (the model ones use the packaged tiny.en); the full runs stay `make bench`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# module -> (marks, regular expressions its output must contain)
BENCHMARKS = {
    "gateway": (
        [pytest.mark.cluster],
        [
            r"completion -> response: p50 [\d.]+ ms, p99 [\d.]+ ms",
            r"target gateway RSS .*: [\d.]+ MB / 600 MB = [\d.]+",
            r"target completion -> answer p99: [\d.]+ ms / 200 ms = [\d.]+",
            r"async submissions: [\d.]+/s",
        ],
    ),
    "control_plane": (
        [pytest.mark.cluster],
        [
            r"latency_ms_p50: [\d.]+",
            r"latency_ms_p99: [\d.]+",
            r"operator_cpu_ms_per_job: [\d.]+",
            r"targets .*: (met|NOT met)",
        ],
    ),
    "pool": (
        [pytest.mark.cluster, pytest.mark.model],
        [
            r"sync POST / of a 7.5 s clip \(tiny.en",
            r"pool +[\d.]+ s +[\d.]+x in-process",
            r"job +[\d.]+ s +[\d.]+x in-process",
            r"pool +total +[\d.]+ s +p50",
        ],
    ),
    "runner_cpu": (
        [pytest.mark.model],
        [r"\| ifw \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", r"\| original \| [\d.]+ \| [\d.]+ \| 1.00 \|"],
    ),
    "quality_asr": (
        [pytest.mark.model],
        [r"### tiny.en", r"\| ifw \| [\d.]+ \| [\d.]+ \|", r"\| faster-whisper \| [\d.]+ \| [\d.]+ \|"],
    ),
    "quality_diarization": (
        [pytest.mark.model],
        [r"\| Harvard conversation \| [\d.]+ \|", r"First call in the process"],
    ),
    "fanout": (
        [pytest.mark.model],
        [
            r"\| 1 \| 1 \| [\d.]+ \| 1.00 \| 1.00 \| 1 \|",
            r"\| 2 \| 2 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| 2 \|",
            r"serial fraction [\d.]+",
            r"Amdahl: 1 h of audio on 8 GPUs: speed-up [\d.]+x",
            r"plot: \S+\.png",
        ],
    ),
}


def run_quick(module: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "PYANNOTE_METRICS_ENABLED": "0",
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", f"bench.{module}", "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return done, time.monotonic() - started


@pytest.mark.parametrize(
    "module", [pytest.param(name, marks=marks, id=name) for name, (marks, _) in BENCHMARKS.items()]
)
def test_benchmark_runs_and_prints_its_figures(module):
    import re

    done, seconds = run_quick(module)
    tail = f"\n--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}"
    assert done.returncode == 0, f"bench.{module} --quick exited {done.returncode} after {seconds:.0f} s{tail}"
    for pattern in BENCHMARKS[module][1]:
        assert re.search(pattern, done.stdout), f"bench.{module} printed no {pattern!r}{tail}"
    if module == "gateway":
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        assert figures["responses_200"] == figures["waiters"] and figures["bad_answers"] == 0, figures
        # --quick keeps the gateway's keep-alive at 1 s: the answers came chunked, spaces first.
        assert figures["answers_chunked_with_keepalive"] > 0, figures
