"""Warm pool vs a runner per job vs a model already loaded in-process, on the local stack.

    python -m bench.pool [--model base] [--repeats 5] [--clips 50] [--skip-job-burst]
    python -m bench.pool --quick    # tiny.en, 1 repeat, a burst of 2 in the pool only (CI)

Real human speech (../shared/speech/harvard), joined with short pauses into a ~7.5 s clip
and ~10 s clips. The same stack (real apiserver, operator, gateway; ifw.local.stack) runs in
two modes, each in a fresh control plane:

1. sync `POST /` of the 7.5 s clip, median of --repeats: pool (one warm worker) vs Job mode
   (a runner process per job through the kubelet stand-in) vs the same clip through an
   already-loaded model in this process (ifw.runner.pipeline.run). Target: pool ≤ 1.5x in-process.
2. --clips concurrent sync requests of 10 s clips: total wall time and per-request p50/p99,
   pool (one worker) vs Job mode (the local stack's cap of 1 runner at a time). Target: pool
   ≥ 5x faster in total.
3. pieces per generate() call in the pool worker for that burst (its /metrics), with
   cross-job batching on and off (IFW_WORKER_CROSS_JOB_BATCHING).

Figures are printed, and written as JSON with --json. Timings on a shared 2-core machine are
noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from bench.procstats import percentile

SPEECH = Path(__file__).resolve().parents[2] / "shared" / "speech" / "harvard"
RATE = 16_000


def _read(path: Path) -> np.ndarray:
    out = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(path), "-ac", "1", "-ar", str(RATE),
                          "-f", "f32le", "pipe:1"], capture_output=True, check=True).stdout  # fmt: skip
    return np.frombuffer(out, dtype=np.float32)


def _write(path: Path, audio: np.ndarray) -> Path:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    subprocess.run(["sox", "-t", "raw", "-r", str(RATE), "-e", "signed", "-b", "16", "-c", "1", "-", str(path)],
                   input=pcm, check=True)  # fmt: skip
    return path


def clip(work: Path, name: str, seconds: float, offset: int = 0) -> Path:
    """Harvard sentences from `offset` on, with 0.4 s pauses, until `seconds` of audio."""
    files = sorted(SPEECH.glob("spk*_snt*.wav"))
    parts, total, i = [], 0.0, offset
    while total < seconds:
        audio = _read(files[i % len(files)])
        parts += [audio, np.zeros(int(0.4 * RATE), np.float32)]
        total += len(audio) / RATE + 0.4
        i += 1
    joined = np.concatenate(parts)[: int(seconds * RATE)]
    return _write(work / name, joined)


def post(url: str, audio: Path) -> tuple[float, int]:
    started = time.monotonic()
    with httpx.Client(timeout=3600) as http:
        response = http.post(f"{url}/", files={"file": (audio.name, audio.read_bytes(), "audio/wav")})
    return time.monotonic() - started, response.status_code


def in_process(model: str, audio: Path, repeats: int) -> list[float]:
    """The floor: the same clip through a model already loaded in this process."""
    from ifw.crds.transcriptionjob import TranscriptionJobSpec
    from ifw.runner import models, pipeline
    from ifw.runner.config import RunnerSettings

    settings = RunnerSettings(default_model=model, device="cpu", cpu_threads=2)
    models.load_model(model, settings)
    spec = TranscriptionJobSpec.model_validate({"audio": {"url": "https://unused.example/a.wav"}})
    samples = _read(audio)
    pipeline.run(spec, samples, settings)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        pipeline.run(spec, samples, settings)
        times.append(time.monotonic() - started)
    return times


def worker_batches(stack) -> tuple[float, float] | None:
    """(generate() calls, pieces decoded) from the pool worker's /metrics, if it reports them."""
    health = getattr(stack, "worker_health_ports", [])
    if not health:
        return None
    text = httpx.get(f"http://127.0.0.1:{health[0]}/metrics", timeout=5).text
    values = {}
    for line in text.splitlines():
        for name in ("ifw_worker_generate_calls_total", "ifw_worker_pieces_decoded_total"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    if len(values) < 2:
        return None
    return values["ifw_worker_generate_calls_total"], values["ifw_worker_pieces_decoded_total"]


def run_mode(mode: str, model: str, short: Path, burst: list[Path], repeats: int, env: dict[str, str]) -> dict:
    import os

    from ifw.local.control_plane import ControlPlane
    from ifw.local.stack import LocalStack

    figures: dict = {}
    work = Path(tempfile.mkdtemp(prefix=f"bench-pool-{mode}-"))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    stack = LocalStack(work, model, pool_workers=1 if mode.startswith("pool") else 0)
    try:
        with ControlPlane() as cp:
            stack.start(cp)
            try:
                post(stack.gateway_url, short)  # warm: page cache, imports, the first job's odd costs
                latencies = []
                for _ in range(repeats):
                    seconds, code = post(stack.gateway_url, short)
                    assert code == 200, code
                    latencies.append(seconds)
                figures["sync_7_5s"] = latencies
                if burst:
                    before = worker_batches(stack)
                    started = time.monotonic()
                    with ThreadPoolExecutor(len(burst)) as pool:
                        answers = list(pool.map(lambda p: post(stack.gateway_url, p), burst))
                    figures["burst_total_s"] = time.monotonic() - started
                    figures["burst_latencies"] = [s for s, _ in answers]
                    figures["burst_codes"] = sorted({c for _, c in answers})
                    after = worker_batches(stack)
                    if before and after and after[0] > before[0]:
                        figures["pieces_per_generate"] = (after[1] - before[1]) / (after[0] - before[0])
            finally:
                stack.stop()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(work, ignore_errors=True)
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="base")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clips", type=int, default=50)
    ap.add_argument("--skip-job-burst", action="store_true", help="Job mode's burst takes ~10 min on 2 cores")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--quick", action="store_true",
                    help="a CI-sized run: tiny.en, 1 repeat, a burst of 2 clips in the pool only")
    args = ap.parse_args()
    if args.quick:
        args.model, args.repeats, args.clips, args.skip_job_burst = "tiny.en", 1, 2, True

    work = Path(tempfile.mkdtemp(prefix="bench-pool-audio-"))
    short = clip(work, "short.wav", 7.5)
    burst = [clip(work, f"burst-{i}.wav", 10.0, offset=i) for i in range(args.clips)]

    figures: dict = {"model": args.model}
    figures["in_process"] = in_process(args.model, short, args.repeats)
    figures["pool"] = run_mode("pool", args.model, short, burst, args.repeats, {})
    if not args.quick:
        figures["pool_no_cross_batching"] = run_mode("pool-solo", args.model, short, burst, 0,
                                                     {"IFW_WORKER_CROSS_JOB_BATCHING": "false"})  # fmt: skip
    figures["job"] = run_mode("job", args.model, short, [] if args.skip_job_burst else burst, args.repeats, {})

    med = {k: statistics.median(v) for k, v in (("in_process", figures["in_process"]),
                                                ("pool", figures["pool"]["sync_7_5s"]),
                                                ("job", figures["job"]["sync_7_5s"]))}  # fmt: skip
    print(f"\nsync POST / of a 7.5 s clip ({args.model}, median of {args.repeats}):")
    for name, value in med.items():
        print(f"  {name:11s} {value:6.2f} s   {value / med['in_process']:5.2f}x in-process")
    print(f"  target: pool <= 1.5x in-process: {'met' if med['pool'] <= 1.5 * med['in_process'] else 'NOT met'}")
    print(f"\n{args.clips} concurrent sync requests of 10 s clips:")
    for name in ("pool", "pool_no_cross_batching", "job"):
        f = figures.get(name, {})
        if "burst_total_s" not in f:
            print(f"  {name:23s} (skipped)")
            continue
        lat = f["burst_latencies"]
        ppg = f.get("pieces_per_generate")
        print(f"  {name:23s} total {f['burst_total_s']:7.1f} s  p50 {percentile(lat, 50):6.1f} s  "
              f"p99 {percentile(lat, 99):6.1f} s  codes {f['burst_codes']}"
              + (f"  pieces/generate {ppg:.1f}" if ppg else ""))  # fmt: skip
    if "burst_total_s" in figures["job"]:
        ratio = figures["job"]["burst_total_s"] / figures["pool"]["burst_total_s"]
        print(f"  pool vs Job mode: {ratio:.1f}x faster in total (target >= 5x: {'met' if ratio >= 5 else 'NOT met'})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    bad = {name: f["burst_codes"] for name, f in figures.items() if isinstance(f, dict) and f.get("burst_codes", [200]) != [200]}
    if bad:
        print(f"bursts answered other than 200: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
