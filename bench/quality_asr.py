"""ASR quality and CPU speed on real human speech: ifw against faster-whisper and the original's call.

Same audio, same model, same threads, one run; every system in its own subprocess
(bench/runner_cpu.py's systems and measure()), model load excluded from the wall time. The
systems run in --repeat rounds, one after the other in each round, and each file counts with its
fastest round (other load on a shared machine only slows a run down).

Audio, from ../shared/speech (read in place):
- harvard       the ten Harvard sentences, one file (one job) each
- conversation  the ten joined into one two-speaker conversation with pauses (~33 s)
- meeting       the five 30 s AMI meeting excerpts: speed only (no reference text)

Systems:
- ifw                    ifw.runner.pipeline.run, the CPU default (fp32)
- ifw-int8               the same with IFW_CPU_INT8=true (int8 Linear layers)
- faster-whisper         BatchedInferencePipeline, int8, as shipped (beam search of 5)
- faster-whisper-greedy  the same with beam_size=1: the search ifw does
- original               the Insanely Fast Whisper API's pipeline(...)(file, chunk_length_s=30,
                         batch_size=..., return_timestamps=True)

Prints WER (words and their order, after normalising case and punctuation) and RTFx (audio
seconds per wall second) per set, speed relative to faster-whisper, and for ifw the decode
engine's generate() calls and pieces per call. --context also measures, in this process,
whether prompting each piece with the previous piece's text (condition_on_previous) helps.

    .venv/bin/python bench/quality_asr.py [--models tiny.en,base] [--threads 2] [--batch-size 8]
                                          [--sets harvard,conversation,meeting] [--repeat 3] [--context] [--json out.json]
    .venv/bin/python -m bench.quality_asr --quick   # tiny.en, ifw vs faster-whisper, the Harvard set, once (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from runner_cpu import measure  # noqa: E402

from tests.runner.conftest import SPEECH_DIR, harvard_conversation, harvard_sentences, word_error_rate  # noqa: E402

VARIANTS = {  # name: (runner_cpu system, extra environment)
    "ifw": ("ifw", {}),
    "ifw-int8": ("ifw", {"IFW_CPU_INT8": "true"}),
    "faster-whisper": ("faster-whisper", {}),
    "faster-whisper-greedy": ("faster-whisper-greedy", {}),
    "original": ("original", {}),
}
BASELINE = "faster-whisper"


def audio_sets(tmp: Path, names: list[str]) -> dict[str, tuple[list[Path], list[str] | None, float]]:
    """set name -> (files, reference texts or None, seconds of audio)."""
    from ifw.runner.audio import decode_audio
    from ifw.runner.config import RunnerSettings

    def seconds(path: Path) -> float:
        return len(decode_audio(path, RunnerSettings())) / 16000

    sets = {}
    if "harvard" in names:
        sentences = harvard_sentences()
        files = [s.path for s in sentences]
        sets["harvard"] = (files, [s.text for s in sentences], sum(seconds(f) for f in files))
    if "conversation" in names:
        clip = harvard_conversation(tmp)
        sets["conversation"] = ([clip.path], [clip.text], clip.duration)
    if "meeting" in names:
        files = sorted((SPEECH_DIR / "ami").glob("*.wav"))
        sets["meeting"] = (files, None, sum(seconds(f) for f in files))
    return sets


def run(args) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="ifw-quality-") as tmp:
        sets = audio_sets(Path(tmp), args.sets.split(","))
        for model in args.models.split(","):
            runs: dict = {}
            # Round robin: every system runs once per round, so a burst of load on a shared
            # machine slows all of them alike; each file counts with its fastest round.
            for round_ in range(args.repeat):
                for variant in args.systems.split(","):
                    system, env = VARIANTS[variant]
                    for set_name, (files, _, _) in sets.items():
                        r = measure(system, files, model=model, batch_size=args.batch_size,
                                    threads=args.threads, env=env)  # fmt: skip
                        print(f"  {model} {variant} {set_name} round {round_ + 1}: {r['wall_s']:.1f} s", file=sys.stderr)
                        best = runs.setdefault((variant, set_name), r)
                        for kept, new in zip(best["files"], r["files"], strict=True):
                            kept["wall_s"] = min(kept["wall_s"], new["wall_s"])
                        best["peak_rss_mb"] = max(best["peak_rss_mb"], r["peak_rss_mb"])
            for (variant, set_name), r in runs.items():
                files, refs, seconds = sets[set_name]
                results.setdefault(model, {}).setdefault(variant, {})[set_name] = summarize(r, refs, seconds, variant)
        if args.context:
            results["context"] = context_experiment(Path(tmp), args)
    return results


def summarize(r: dict, refs: list[str] | None, seconds: float, variant: str) -> dict:
    files = r["files"]
    wall = sum(f["wall_s"] for f in files)
    texts = [f["text"] for f in files]
    row = {"wall_s": wall, "rtfx": seconds / wall, "peak_rss_mb": r["peak_rss_mb"], "load_s": r["load_s"],
           "texts": texts}  # fmt: skip
    if refs:
        # one WER over all the set's words (not a mean of per-file rates)
        row["wer"] = word_error_rate(" ".join(refs), " ".join(texts))
    if VARIANTS[variant][0] == "ifw":
        calls = sum(f["generate_calls"] for f in files)
        row |= {"generate_calls": calls, "pieces_per_call": sum(f["pieces"] for f in files) / max(1, calls),
                "fallback_decodes": sum(f["fallback_decodes"] for f in files),
                "dropped_pieces": sum(f["dropped_pieces"] for f in files),
                "speech_s": sum(f["speech_s"] or 0 for f in files), "text_s": sum(f["text_s"] or 0 for f in files),
                "languages": sorted({f["language"] for f in files if f["speech_s"]})}  # fmt: skip
    return row


def context_experiment(tmp: Path, args) -> dict:
    """WER of the conversation with and without each piece prompted by the previous piece's text,
    with the pieces as the VAD packs them (≤30 s) and with one piece per sentence (nine boundaries)."""
    import torch

    from ifw.runner import asr, models, vad
    from ifw.runner.config import RunnerSettings

    torch.set_num_threads(args.threads)
    clip = harvard_conversation(tmp)
    audio = clip.audio()
    regions = vad.speech_regions(audio)
    cuts = {"vad": vad.plan_pieces(regions), "sentence": [vad.Piece(a, b, ((a, b),)) for a, b in regions]}
    out: dict = {}
    for model in args.models.split(","):
        whisper = models.load_model(model, RunnerSettings(default_model=model, device="cpu", cpu_threads=args.threads))
        for cut, pieces in cuts.items():
            for context in (False, True):
                t = asr.transcribe(audio, whisper, batch_size=args.batch_size, pieces=pieces, condition_on_previous=context)
                out.setdefault(model, {})[f"{cut}, {'previous text' if context else 'no context'}"] = {
                    "pieces": len(pieces), "wer": word_error_rate(clip.text, t.text), "text": t.text}
    return out


def report(results: dict, args) -> None:
    for model, variants in results.items():
        if model == "context":
            continue
        print(f"\n### {model}  ({args.threads} threads, batch {args.batch_size})\n")
        sets = list(next(iter(variants.values())))
        head = " | ".join(f"{s} WER | {s} RTFx" for s in sets)
        print(f"| system | {head} | speed vs {BASELINE} (all audio) | peak RSS MB |")
        print("|---|" + "---|" * (2 * len(sets) + 2))
        base_wall = sum(r["wall_s"] for r in variants.get(BASELINE, {}).values()) or None
        for variant, rows in variants.items():
            cells = " | ".join(
                (f"{rows[s]['wer']:.3f}" if "wer" in rows[s] else "-") + f" | {rows[s]['rtfx']:.1f}" for s in sets
            )
            wall = sum(r["wall_s"] for r in rows.values())
            ratio = f"{base_wall / wall:.2f}x" if base_wall else "-"
            print(f"| {variant} | {cells} | {ratio} | {max(r['peak_rss_mb'] for r in rows.values()):.0f} |")
        for variant in ("ifw", "ifw-int8"):
            if variant in variants:
                print(f"\n{variant} decode engine: " + "; ".join(
                    f"{s}: {r['generate_calls']} generate() calls, {r['pieces_per_call']:.1f} pieces/call, "
                    f"{r['fallback_decodes']} fallback decodes, {r['dropped_pieces']} dropped, "
                    f"text {r['text_s']:.1f} of {r['speech_s']:.1f} s speech, languages {','.join(r['languages'])}"
                    for s, r in variants[variant].items()))  # fmt: skip
    if "context" in results:
        print("\n### context across pieces (conversation WER)\n")
        print("| model | pieces | no context | previous piece's text as prompt |")
        print("|---|---|---|---|")
        for model, rows in results["context"].items():
            for cut in ("vad", "sentence"):
                a, b = rows[f"{cut}, no context"], rows[f"{cut}, previous text"]
                print(f"| {model} | {a['pieces']} ({cut}) | {a['wer']:.3f} | {b['wer']:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny.en,base")
    p.add_argument("--systems", default=",".join(VARIANTS))
    p.add_argument("--sets", default="harvard,conversation,meeting")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3, help="rounds over all systems; each file's fastest counts")
    p.add_argument("--context", action="store_true", help="also measure conditioning on the previous piece")
    p.add_argument("--skip-original-base", action="store_true", help="run the original's call on tiny.en only")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--quick", action="store_true", help="a CI-sized run: tiny.en, ifw vs faster-whisper, harvard, once")
    args = p.parse_args()
    if args.quick:
        args.models, args.systems, args.sets, args.repeat = "tiny.en", f"ifw,{BASELINE}", "harvard", 1
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    results = run(args)
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
