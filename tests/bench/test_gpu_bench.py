"""bench/gpu_bench.py in its CPU form: a tiny random Whisper through ifw's decode path, offline.

The lent GPU machine has torch and transformers only; --hide-control-plane-deps imports ifw as
it would there (pydantic & co. missing), so a change that breaks the GPU run breaks here first.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from bench import gpu_bench

ROOT = Path(__file__).resolve().parents[2]
TOKENS = 24


def run_bench(out: Path, *args: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--tiny", "--tokens", str(TOKENS), "--repeats", "1",
           "--cpu-threads", "1", "--out", str(out), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    logs = (out / "children.log").read_text() if (out / "children.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs}"
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_tiny_run_as_on_the_gpu_machine(tmp_path):
    rows = run_bench(tmp_path, "--hide-control-plane-deps")
    expected = {(g.name, b, ts) for g in gpu_bench.TINY_PLAN for b, ts in g.points}
    assert {(r["group"], r["batch"], r["timestamps"]) for r in rows} == expected
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ifw_import"].startswith("stand-ins for ") and "pydantic" in r["ifw_import"], r["ifw_import"]
        assert r["rtfx"] > 0 and r["wall_s"] > 0 and r["audio_s"] == 30 * r["batch"]
        # exactly the fixed token count, then the end token; one generate() call, no fallback
        assert r["tokens_min"] == r["tokens_max"] == TOKENS, r
        assert r["verdicts"] == ["ok"] and r["generate_calls"] == [1] and r["oom_halvings"] == 0, r
        assert r["init_s"] > 0 and r["device"] == "cpu"
        if r["timestamps"] == "word":
            assert r["word_timed_pieces"] == r["batch"], r
    summary = (tmp_path / "summary.md").read_text()
    for r in rows:
        assert f"| {r['group']} | {r['timestamps']} | {r['batch']} | {r['rtfx']:.1f} |" in summary
    assert (tmp_path / "rtfx.png").exists() == bool(importlib.util.find_spec("matplotlib"))


def test_tiny_run_with_ifw_installed(tmp_path):
    (row,) = run_bench(tmp_path, "--only", "tiny.fp32.sdpa", "--batches", "2", "--timestamps", "chunk")
    assert row["status"] == "ok" and row["ifw_import"] == "real", row
    assert row["tokens_min"] == row["tokens_max"] == TOKENS and row["rtfx"] > 0


def test_gpu_plan_fits_one_short_call():
    """The default GPU plan (without FlashAttention-2, which the lent image lacks) within its deadline."""
    plan = [g for g in gpu_bench.GPU_PLAN if g.attn != "fa2"]
    assert sum(gpu_bench.estimate(g, 128, 2) for g in plan) < 390
    assert plan[0].name == "large-v3.fp16.sdpa" and (64, "chunk") in plan[0].points  # the target, first
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--dry-run", "--only", "turbo"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0 and "estimated" in out.stdout and "turbo.fp16.sdpa" in out.stdout, out
