"""Memory and time of the runner's audio decode (runner/audio.py) and VAD (runner/vad.py), each case in
its own process.

Cases:
- silence: hours of silence as a small Opus file (7 h, ~10 MB), over the length limit (6 h):
  it must be refused before its samples are held
- silence-x4: four of them at once, in threads (one worker, four jobs)
- speech: an hour of real speech (../shared/speech, joined and looped) as an MP3: decoded,
  it is 3.84 MB a minute of float32 at 16 kHz; the decode should cost about that, not a multiple
- speech+vad: the same hour decoded, then cut into pieces by the VAD (vad.split_audio, its model
  loaded then, as a process's first job loads it): the peak of the two stages together should stay
  under about twice the samples (issue 19); the VAD's own part is reported too

Reported per case: the outcome, wall seconds, the peak RSS of the decode above the process's RSS
before it (VmHWM, reset first), that peak over the decoded samples' size, and the RSS left
once the result is dropped; for speech+vad also the VAD's peak above the RSS it started from.

    .venv/bin/python -m bench.audio_memory [--quick] [--module PATH] [--vad-module PATH] [--json out.json]

--module decodes with another copy of audio.py, --vad-module runs another copy of vad.py, for a
before/after comparison:
    git show HEAD:runner/audio.py > /tmp/audio_head.py
    .venv/bin/python -m bench.audio_memory --module /tmp/audio_head.py
--quick scales every case down 60× (7 min of silence against a 6 min limit, 1 min of speech):
seconds, for CI.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEECH = ROOT.parent / "shared" / "speech"
HOUR = 3600.0


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def make_silence(dest: Path, seconds: float) -> Path:
    """Silence as 3 kbit/s Opus: one minute encoded, then looped by stream copy (seconds, not minutes)."""
    minute = dest.with_suffix(".minute.opus")
    _ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "60", "-c:a", "libopus", "-b:a", "3k", str(minute))
    _ffmpeg("-stream_loop", str(round(seconds / 60) - 1), "-i", str(minute), "-c", "copy", str(dest))
    minute.unlink()
    return dest


def make_speech(dest: Path, seconds: float) -> Path:
    """Real speech (every clip in ../shared/speech, joined) as a 64 kbit/s MP3, looped to `seconds`."""
    clips = sorted((SPEECH / "ami").glob("*.wav")) + sorted((SPEECH / "harvard").glob("*.wav"))
    inputs = [arg for clip in clips for arg in ("-i", str(clip))]
    # the clips differ in sample format (s16, float): the filter joins them where the demuxer cannot
    joined = "".join(f"[{i}:a]aformat=s16:16000:mono[a{i}];" for i in range(len(clips)))
    joined += "".join(f"[a{i}]" for i in range(len(clips))) + f"concat=n={len(clips)}:v=0:a=1"
    once = dest.with_suffix(".once.mp3")
    _ffmpeg(*inputs, "-filter_complex", joined, "-b:a", "64k", str(once))
    _ffmpeg("-stream_loop", "-1", "-i", str(once), "-t", f"{seconds:.0f}", "-c", "copy", str(dest))
    once.unlink()
    return dest


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _load(name: str, module_path: str):
    spec = importlib.util.spec_from_file_location(name, module_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def child(module_path: str | None, path: Path, limit_s: float, jobs: int, vad_module: str | None = None,
          with_vad: bool = False) -> dict:  # fmt: skip
    """Runs in its own process: decode `path` `jobs` times at once (then cut each into pieces), measure."""
    import gc

    from ifw.runner import errors
    from ifw.runner.config import RunnerSettings

    if module_path:
        audio = _load("audio_under_test", module_path)
    else:
        from ifw.runner import audio
    if with_vad:  # imported here (as the runner imports it); its model loads in the measured stage
        if vad_module:
            vad = _load("vad_under_test", vad_module)
        else:
            from ifw.runner import vad
    settings = RunnerSettings(max_audio_seconds=limit_s)
    outcomes: list[str] = [""] * jobs
    results: list = [None] * jobs

    def one(i: int) -> None:
        try:
            results[i] = audio.decode_audio(path, settings)
            outcomes[i] = f"decoded {len(results[i]) / 16000:.0f} s"
        except errors.RunnerError as error:
            outcomes[i] = str(error.reason)

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the decode alone
    before = _status_kib("VmRSS")
    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    peak = _status_kib("VmHWM")
    vad_figures = {}
    if with_vad:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: from here, the VAD's peak
        vad_before = _status_kib("VmRSS")
        pieces = [len(vad.split_audio(r)) for r in results if r is not None]
        vad_peak = _status_kib("VmHWM")
        peak = max(peak, vad_peak)
        vad_figures = {"pieces": sum(pieces), "vad_mib": round((vad_peak - vad_before) / 1024, 1)}
    seconds = time.perf_counter() - started
    samples = sum(len(r) for r in results if r is not None)
    results.clear()
    gc.collect()
    return {
        "outcome": ", ".join(sorted(set(outcomes))),
        "seconds": round(seconds, 2),
        "peak_mib": round((peak - before) / 1024, 1),
        "samples_mib": round(samples * 4 / 1024**2, 1),
        "peak_over_samples": round((peak - before) / 1024 / (samples * 4 / 1024**2), 2) if samples else None,
        "left_mib": round((_status_kib("VmRSS") - before) / 1024, 1),
        **vad_figures,
    }


def run(quick: bool, module: str | None, work: Path, vad_module: str | None = None) -> dict[str, dict]:
    scale = 60.0 if quick else 1.0
    limit = 6 * HOUR / scale
    silence = make_silence(work / "silence.opus", 7 * HOUR / scale)
    speech = make_speech(work / "speech.mp3", HOUR / scale)
    cases = {"silence": (silence, 1), "silence-x4": (silence, 4), "speech": (speech, 1), "speech+vad": (speech, 1)}
    report = {}
    for name, (path, jobs) in cases.items():
        cmd = [
            sys.executable,
            "-m",
            "bench.audio_memory",
            "--child",
            str(path),
            "--limit",
            str(limit),
            "--jobs",
            str(jobs),
        ]
        if module:
            cmd += ["--module", module]
        if name.endswith("+vad"):
            cmd += ["--vad"] + (["--vad-module", vad_module] if vad_module else [])
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        report[name] = json.loads(done.stdout.splitlines()[-1])
        report[name]["file_mib"] = round(path.stat().st_size / 1024**2, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every case 60x shorter (CI)")
    p.add_argument("--module", help="decode with this copy of audio.py instead of ifw.runner.audio")
    p.add_argument("--vad-module", help="cut into pieces with this copy of vad.py instead of ifw.runner.vad")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    p.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--vad", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.module, args.child, args.limit, args.jobs, args.vad_module, args.vad)))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="ifw-audio-bench-") as work:
        report = run(args.quick, args.module, Path(work), args.vad_module)
    print(
        f"{'case':<11} {'file':>8} {'outcome':<22} {'seconds':>8} {'peak':>9} {'samples':>9} {'peak/samples':>12} {'left':>8}"
    )
    for name, r in report.items():
        ratio = "" if r["peak_over_samples"] is None else f"{r['peak_over_samples']:.2f}"
        print(f"{name:<11} {r['file_mib']:>6.1f}MB {r['outcome']:<22} {r['seconds']:>8.2f} {r['peak_mib']:>7.1f}MB "
              f"{r['samples_mib']:>7.1f}MB {ratio:>12} {r['left_mib']:>6.1f}MB")  # fmt: skip
    both = report["speech+vad"]
    print(f"decode + VAD ({both['pieces']} pieces): peak {both['peak_mib']:.1f} MB = {both['peak_over_samples']:.2f} x "
          f"the samples (target: about 2 or less; the VAD's part {both['vad_mib']:.1f} MB, its model included)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
