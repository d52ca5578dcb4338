"""CPU benchmark: this runner vs the original API's pipeline call vs faster-whisper.

Same audio (≥3 min of espeak-ng speech with pauses, generated here), same
model (packaged tiny.en by default), same threads, one run. Each system runs in
its own subprocess so its peak RSS can be measured (os.wait4). Reports wall
time (model load excluded, decoding of the file included), RTFx (audio seconds
per wall second), the speed ratio to the original's call, WER against what was
spoken, and peak RSS.

    .venv/bin/python bench/runner_cpu.py [--model tiny.en|base] [--batch-size 8] [--threads 2] [--json out.json]

Systems:
- ifw: ifw.runner.pipeline.run (ffmpeg decode, Silero VAD pieces, batched generate)
- original: pipeline("automatic-speech-recognition", model=...)(file, chunk_length_s=30,
  batch_size=..., return_timestamps=True), as the Insanely Fast Whisper API calls it
- faster-whisper: BatchedInferencePipeline on the packaged CTranslate2 files (int8, as on CPU)
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

ROOT = Path(__file__).resolve().parents[1]
PAUSES = [0.8, 1.5, 2.5, 1.0, 3.0]


def make_audio(dest: Path, min_seconds: float = 180.0):
    sys.path.insert(0, str(ROOT))
    from tests.runner.conftest import SENTENCES, SpeechFactory

    parts, i = [], 0
    factory = SpeechFactory(dest)
    while True:
        parts.append((("en-us", "en-gb")[i % 2], SENTENCES[i % len(SENTENCES)], PAUSES[i % len(PAUSES)]))
        i += 1
        if i % 5 == 0:
            clip = factory(parts, name="bench")
            if clip.duration >= min_seconds:
                return clip


# ------------------------------------------------------------- the systems


def run_ifw(audio: str, model: str, batch_size: int):
    from ifw.crds.transcriptionjob import AudioSource, TranscriptionJobSpec
    from ifw.runner import asr, pipeline
    from ifw.runner.config import RunnerSettings

    settings = RunnerSettings(default_model=model, device="cpu", cpu_threads=int(os.environ["OMP_NUM_THREADS"]))
    spec = TranscriptionJobSpec(audio=AudioSource.model_construct(url=audio), model=model, batch_size=batch_size)
    t0 = time.perf_counter()
    asr.load_model(model, settings)
    from ifw.runner import vad

    vad._silero()
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    transcript = pipeline.run(spec, audio, settings)
    return load, time.perf_counter() - t0, transcript.text, len(transcript.segments)


def run_original(audio: str, model: str, batch_size: int):
    import torch
    from transformers import pipeline

    from ifw.runner import weights

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    t0 = time.perf_counter()
    path = weights.packaged_model_path(model) if model in weights.PACKAGED else model
    pipe = pipeline("automatic-speech-recognition", model=str(path), dtype=torch.float32, device="cpu")
    load = time.perf_counter() - t0
    multilingual = pipe.model.generation_config.is_multilingual
    t0 = time.perf_counter()
    out = pipe(
        audio,
        chunk_length_s=30,
        batch_size=batch_size,
        # the original always passes task and language (None = detect); English-only models take neither
        generate_kwargs={"task": "transcribe", "language": None} if multilingual else {},
        return_timestamps=True,
    )
    return load, time.perf_counter() - t0, out["text"], len(out["chunks"])


def run_faster_whisper(audio: str, model: str, batch_size: int):
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from ifw.runner import weights

    parts, _, _ = weights.source_files(model)
    folder = parts[0].parent
    if len(parts) > 1:  # ctranslate2 needs one model.bin
        folder = Path(tempfile.mkdtemp(prefix="ct2-"))
        (folder / "model.bin").write_bytes(b"".join(p.read_bytes() for p in parts))
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            (folder / name).write_bytes((weights.source_files(model)[1].parent / name).read_bytes())
    t0 = time.perf_counter()
    fw = WhisperModel(str(folder), device="cpu", compute_type="int8", cpu_threads=int(os.environ["OMP_NUM_THREADS"]))
    pipe = BatchedInferencePipeline(fw)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    segments, _info = pipe.transcribe(audio, batch_size=batch_size, language="en" if model.endswith(".en") else None)
    segments = list(segments)
    return load, time.perf_counter() - t0, " ".join(s.text.strip() for s in segments), len(segments)


SYSTEMS = {"ifw": run_ifw, "original": run_original, "faster-whisper": run_faster_whisper}


def child(args) -> None:
    load, wall, text, n = SYSTEMS[args.system](args.audio, args.model, args.batch_size)
    json.dump({"load_s": load, "wall_s": wall, "text": text, "segments": n}, sys.stdout)


def measure(system: str, audio: Path, args) -> dict:
    """Run one system in a subprocess; its peak RSS comes from wait4."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    cmd = [sys.executable, __file__, "--child", system, "--audio", str(audio), "--model", args.model,
           "--batch-size", str(args.batch_size)]  # fmt: skip
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{system} failed ({proc.returncode}):\n{err.read().decode()[-4000:]}")
        result = json.loads(out.read())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny.en", help="packaged name (tiny.en, base)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--systems", default="ifw,original,faster-whisper")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--child", choices=list(SYSTEMS), dest="system", help=argparse.SUPPRESS)
    p.add_argument("--audio", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.system:
        return child(args)

    sys.path.insert(0, str(ROOT))
    from tests.runner.conftest import word_error_rate

    with tempfile.TemporaryDirectory(prefix="ifw-bench-") as tmp:
        clip = make_audio(Path(tmp))
        speech_s = sum(u.end - u.start for u in clip.utterances)
        print(f"audio: {clip.duration:.1f} s ({speech_s:.1f} s speech, {len(clip.utterances)} sentences, 2 voices); "
              f"model {args.model}, batch {args.batch_size}, {args.threads} threads, {os.cpu_count()} CPUs")  # fmt: skip
        results = {}
        for system in args.systems.split(","):
            r = measure(system, clip.path, args)
            r["wer"] = word_error_rate(clip.text, r["text"])
            r["rtfx"] = clip.duration / r["wall_s"]
            results[system] = r
            print(f"  {system}: {r['wall_s']:.1f} s", file=sys.stderr)

    base = results.get("original", {}).get("wall_s")
    print("\n| system | wall s | RTFx | x original | WER | segments | peak RSS MB | load s |")
    print("|---|---|---|---|---|---|---|---|")
    for system, r in results.items():
        ratio = f"{base / r['wall_s']:.2f}" if base else "-"
        print(f"| {system} | {r['wall_s']:.1f} | {r['rtfx']:.1f} | {ratio} | {r['wer']:.3f} | {r['segments']} "
              f"| {r['peak_rss_mb']:.0f} | {r['load_s']:.1f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"audio_s": clip.duration, "model": args.model, "results": results}, indent=2))


if __name__ == "__main__":
    main()
