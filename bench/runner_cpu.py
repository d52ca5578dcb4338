"""CPU benchmark: this runner vs the original API's pipeline call vs faster-whisper.

Same audio (≥3 min of espeak-ng speech with pauses, generated here), same
model (packaged tiny.en by default), same threads, one run. Each system runs in
its own subprocess so its peak RSS can be measured (os.wait4). Reports wall
time (model load excluded, decoding of the file included), RTFx (audio seconds
per wall second), the speed ratio to the original's call, WER against what was
spoken, and peak RSS.

    .venv/bin/python bench/runner_cpu.py [--model tiny.en|base] [--batch-size 8] [--threads 2] [--json out.json]
    .venv/bin/python -m bench.runner_cpu --quick   # ~20 s of audio, ifw vs the original's call (CI)

Systems:
- ifw: ifw.runner.pipeline.run (ffmpeg decode, Silero VAD pieces, batched generate); ifw-static:
  the same with IFW_DECODER_CACHE=static (`--systems ifw,ifw-static` compares the two)
- original: pipeline("automatic-speech-recognition", model=...)(file, chunk_length_s=30,
  batch_size=..., return_timestamps=True), as the Insanely Fast Whisper API calls it
- faster-whisper: BatchedInferencePipeline on the packaged CTranslate2 files (int8, as on CPU),
  as shipped (beam 5); faster-whisper-greedy: the same with beam_size=1, the search ifw does

bench/quality_asr.py reuses these systems on real speech.
"""

from __future__ import annotations

import argparse
import functools
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
# Each loader loads its model (timed as load) and returns transcribe(path) -> (text, segments, extra).


def load_ifw(model: str, batch_size: int, decoder_cache: str | None = None):
    from ifw.crds.transcriptionjob import AudioSource, TranscriptionJobSpec
    from ifw.runner import decoding, models, pipeline, vad
    from ifw.runner.config import RunnerSettings

    # IFW_CPU_INT8, IFW_CONDITION_ON_PREVIOUS and the like come from the environment
    settings = RunnerSettings(default_model=model, device="cpu", cpu_threads=int(os.environ["OMP_NUM_THREADS"]),
                              **({"decoder_cache": decoder_cache} if decoder_cache else {}))  # fmt: skip
    models.load_model(model, settings)
    vad._silero()

    def transcribe(audio: str):
        spec = TranscriptionJobSpec(audio=AudioSource.model_construct(url=audio), model=model, batch_size=batch_size)
        stats = decoding.DecodeStats()
        t = pipeline.run(spec, audio, settings, stats=stats)
        extra = {"generate_calls": stats.generate_calls, "pieces": sum(stats.pieces),
                 "fallback_decodes": stats.fallback_decodes, "dropped_pieces": t.dropped_pieces,
                 "speech_s": t.speech_seconds, "text_s": t.text_seconds, "language": t.language}  # fmt: skip
        return t.text, len(t.segments), extra

    return transcribe


def load_original(model: str, batch_size: int):
    import torch
    from transformers import pipeline

    from ifw.runner import weights

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    path = weights.packaged_model_path(model) if model in weights.PACKAGED else model
    pipe = pipeline("automatic-speech-recognition", model=str(path), dtype=torch.float32, device="cpu")
    multilingual = pipe.model.generation_config.is_multilingual

    def transcribe(audio: str):
        out = pipe(
            audio,
            chunk_length_s=30,
            batch_size=batch_size,
            # the original always passes task and language (None = detect); English-only models take neither
            generate_kwargs={"task": "transcribe", "language": None} if multilingual else {},
            return_timestamps=True,
        )
        return out["text"], len(out["chunks"]), {}

    return transcribe


def _faster_whisper(model: str, batch_size: int, beam_size: int):
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    from ifw.runner import weights

    parts, _, _ = weights.source_files(model)
    folder = parts[0].parent
    if len(parts) > 1:  # ctranslate2 needs one model.bin
        folder = Path(tempfile.mkdtemp(prefix="ct2-"))
        (folder / "model.bin").write_bytes(b"".join(p.read_bytes() for p in parts))
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            (folder / name).write_bytes((weights.source_files(model)[1].parent / name).read_bytes())
    fw = WhisperModel(str(folder), device="cpu", compute_type="int8", cpu_threads=int(os.environ["OMP_NUM_THREADS"]))
    pipe = BatchedInferencePipeline(fw)

    def transcribe(audio: str):
        segments, info = pipe.transcribe(audio, batch_size=batch_size, beam_size=beam_size,
                                         language="en" if model.endswith(".en") else None)  # fmt: skip
        segments = list(segments)
        return " ".join(s.text.strip() for s in segments), len(segments), {"language": info.language}

    return transcribe


def load_faster_whisper(model: str, batch_size: int):
    """Its batched pipeline as shipped: beam search of 5."""
    return _faster_whisper(model, batch_size, beam_size=5)


def load_faster_whisper_greedy(model: str, batch_size: int):
    """The same with greedy decoding, the search ifw does."""
    return _faster_whisper(model, batch_size, beam_size=1)


SYSTEMS = {
    "ifw": load_ifw,
    # IFW_DECODER_CACHE=static (compile is left to bench/gpu_bench.py: on CPU its warm-up takes minutes)
    "ifw-static": functools.partial(load_ifw, decoder_cache="static"),
    "original": load_original,
    "faster-whisper": load_faster_whisper,
    "faster-whisper-greedy": load_faster_whisper_greedy,
}


def child(system: str, audios: list[str], model: str, batch_size: int, repeat: int = 1) -> None:
    t0 = time.perf_counter()
    transcribe = SYSTEMS[system](model, batch_size)
    load = time.perf_counter() - t0
    files = []
    for audio in audios:
        walls = []
        for _ in range(repeat):  # the fastest of `repeat` runs: the machine's other load only slows a run down
            t0 = time.perf_counter()
            text, n, extra = transcribe(audio)
            walls.append(time.perf_counter() - t0)
        files.append({"wall_s": min(walls), "text": text, "segments": n, **extra})
    json.dump({"load_s": load, "files": files}, sys.stdout)


def measure(system: str, audios: list[Path], *, model: str, batch_size: int, threads: int,
            env: dict[str, str] | None = None, repeat: int = 1) -> dict:  # fmt: skip
    """Run one system on the files in a subprocess (model loaded once); its peak RSS comes from wait4.

    Each file's wall time is the fastest of `repeat` runs."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", **(env or {})}  # fmt: skip
    cmd = [sys.executable, __file__, "--child", system, "--model", model, "--batch-size", str(batch_size),
           "--repeat", str(repeat)]  # fmt: skip
    for audio in audios:
        cmd += ["--audio", str(audio)]
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
    result["wall_s"] = sum(f["wall_s"] for f in result["files"])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny.en", help="packaged name (tiny.en, base)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--systems", default="ifw,original,faster-whisper,faster-whisper-greedy")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--child", choices=list(SYSTEMS), dest="system", help=argparse.SUPPRESS)
    p.add_argument("--audio", action="append", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1, help="runs per system; the fastest counts")
    p.add_argument("--seconds", type=float, default=180.0, help="at least this much audio")
    p.add_argument("--quick", action="store_true", help="a CI-sized run: ~20 s of audio, ifw vs the original's call")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.systems = 20.0, "ifw,original"
    if args.system:
        return child(args.system, args.audio, args.model, args.batch_size, args.repeat)

    sys.path.insert(0, str(ROOT))
    from tests.runner.conftest import word_error_rate

    with tempfile.TemporaryDirectory(prefix="ifw-bench-") as tmp:
        clip = make_audio(Path(tmp), args.seconds)
        speech_s = sum(u.end - u.start for u in clip.utterances)
        print(f"audio: {clip.duration:.1f} s ({speech_s:.1f} s speech, {len(clip.utterances)} sentences, 2 voices); "
              f"model {args.model}, batch {args.batch_size}, {args.threads} threads, {os.cpu_count()} CPUs")  # fmt: skip
        results = {}
        for system in args.systems.split(","):
            r = measure(system, [clip.path], model=args.model, batch_size=args.batch_size, threads=args.threads,
                        repeat=args.repeat)
            r["text"], r["segments"] = r["files"][0]["text"], r["files"][0]["segments"]
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
