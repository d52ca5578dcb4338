"""Fan-out benchmark: one long file of real speech as 1, 2 and 4 shards, each shard its own process.

The file is real human speech from ../shared/speech (the Harvard conversation and the AMI meeting
excerpts, joined with short pauses and repeated to --minutes). Every configuration runs the way
`ifw-runner transcribe FILE --shards N` does (ifw.runner.shard.run_local: N spawned processes, one
CPU thread each by default, then ifw.core.shards.merge), 1 shard included, so all pay the same
process start and model load. Reports per shard count: wall time, speed-up over 1 shard,
efficiency against the ideal (speed-up / shards), and the serial part that bounds the speed-up on
a big cluster: the time before the first shard starts decoding (process start, model load, the
probe of the file's length, the VAD at its cuts) and the merge; and where the sharded words
differ from the unsharded ones (each differing word counted at the cut nearest to it). From the
serial fraction of the 1-shard run it prints what Amdahl's law predicts for 1 h of audio on 8 GPUs,
and it writes a PNG of speed-up against shards with the ideal line.

    .venv/bin/python -m bench.fanout [--minutes 60] [--shards 1,2,4] [--model tiny.en|base] [--png out.png]
    .venv/bin/python -m bench.fanout --quick   # ~2.5 min of audio, 1 and 2 shards (CI)

On a machine with fewer cores than shards the shards share the cores: the speed-up stops at the
core count (this benchmark's 2-core CI runner shows it at 4 shards).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def amdahl(serial_fraction: float, n: int) -> float:
    return 1.0 / (serial_fraction + (1.0 - serial_fraction) / n)


def run(path: Path, count: int, args) -> dict:
    """One configuration: wall time, the merge, and where each shard's time went."""
    from ifw.core import shards
    from ifw.crds.transcriptionjob import AudioSource, TranscriptionJobSpec
    from ifw.runner.config import RunnerSettings
    from ifw.runner.shard import run_local

    settings = RunnerSettings(default_model=args.model, allowed_models=[args.model], device="cpu",
                              diarization_pipeline="packaged")  # fmt: skip
    spec = TranscriptionJobSpec.model_validate({"audio": AudioSource.model_construct(url=str(path)),
                                                "model": args.model, "language": "en", "batchSize": args.batch_size,
                                                "diarization": {"enabled": args.diarize}})  # fmt: skip
    started = time.time()
    partials = run_local(spec, path, count, settings, threads=args.threads_per_shard,
                         min_shard_seconds=args.min_shard_seconds)  # fmt: skip
    merging = time.time()
    transcript = shards.merge(partials)
    finished = time.time()
    used = [p for p in partials if not p.unused]
    # Before a shard decodes: its process start (spawn, imports), model load, fetch, probe, cut.
    before = [p.timings["started_at"] - started + sum(p.timings.get(k, 0.0) for k in ("load", "fetch", "probe", "cut"))
              for p in used]  # fmt: skip
    return {
        "shards": count,
        "used": len(used),
        "wall_s": finished - started,
        "merge_s": finished - merging,
        "before_decoding_s": min(before),
        "before_decoding_max_s": max(before),
        "spawn_s": min(p.timings["started_at"] - started for p in used),
        "load_s": max(p.timings.get("load", 0.0) for p in used),
        "cut_s": max(p.timings.get("probe", 0.0) + p.timings.get("cut", 0.0) for p in used),
        "shard_wall_s": [p.timings["finished_at"] - p.timings["started_at"] for p in used],
        "cuts": [p.start for p in used[1:]],
        "text": transcript.text,
        "segments": [(seg.start, seg.end, seg.text) for seg in transcript.segments],
        "speech_seconds": transcript.speech_seconds,
        "text_seconds": transcript.text_seconds,
    }


def words_differing_by_cut(one: dict, sharded: dict) -> list[tuple[float, int]]:
    """Where the sharded words differ from the unsharded ones: (cut, words) for each cut, each edit
    of the WER's alignment (a substitution, insertion or deletion of a run of words: its longer
    side) counted at the cut nearest to it. A word's time is its place in its segment, spread evenly."""
    import jiwer

    from tests.runner.conftest import normalize_text

    def timed(segments):
        out = []
        for start, end, text in segments:
            words = normalize_text(text).split()
            out += [(w, start + (end - start) * (k + 0.5) / len(words)) for k, w in enumerate(words)]
        return out

    a, b = timed(one["segments"]), timed(sharded["segments"])
    counts = {cut: 0 for cut in sharded["cuts"]}
    if not counts or not a or not b:
        return sorted(counts.items())
    out = jiwer.process_words(" ".join(w for w, _ in a), " ".join(w for w, _ in b))
    for chunk in out.alignments[0]:
        if chunk.type != "equal":
            i, j, k, m = chunk.ref_start_idx, chunk.ref_end_idx, chunk.hyp_start_idx, chunk.hyp_end_idx
            at = a[i][1] if i < len(a) else b[min(k, len(b) - 1)][1]
            counts[min(counts, key=lambda cut: abs(cut - at))] += max(j - i, m - k)
    return sorted(counts.items())


def plot(results: list[dict], serial_fraction: float, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [r["shards"] for r in results]
    top = max(8, max(counts))
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot([1, top], [1, top], "--", color="grey", label="ideal")
    xs = list(range(1, top + 1))
    ax.plot(xs, [amdahl(serial_fraction, n) for n in xs], ":", color="tab:orange",
            label=f"Amdahl, serial fraction {serial_fraction:.3f}")  # fmt: skip
    ax.plot(counts, [r["speedup"] for r in results], "o-", color="tab:blue", label="measured")
    ax.set_xlabel("shards (processes, one CPU thread each)")
    ax.set_ylabel("speed-up over 1 shard")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0.5, top + 0.5)
    ax.set_ylim(0, top + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=60.0, help="length of the real-speech file (default 60)")
    p.add_argument("--shards", default="1,2,4", help="shard counts to compare (default 1,2,4)")
    p.add_argument("--model", default="tiny.en", help="packaged name (tiny.en, base)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads-per-shard", type=int, default=1)
    p.add_argument("--min-shard-seconds", type=float, default=300.0)
    p.add_argument("--diarize", action="store_true", help="diarize too (each shard, then the global clustering)")
    p.add_argument("--png", type=Path, default=HERE / "fanout.png", help="where the plot goes")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--quick", action="store_true", help="a CI-sized run: ~2.5 min of audio, 1 and 2 shards")
    args = p.parse_args()
    if args.quick:
        args.minutes, args.shards, args.min_shard_seconds = 2.5, "1,2", 60.0
        if args.png == HERE / "fanout.png":  # the committed plot is the full run's
            args.png = Path(tempfile.gettempdir()) / "ifw-fanout-quick.png"
    counts = [int(n) for n in args.shards.split(",")]
    if counts[0] != 1:
        p.error("--shards must start with 1: the speed-ups are measured against one shard")

    sys.path.insert(0, str(ROOT))
    import jiwer

    from tests.runner.conftest import normalize_text
    from tests.runner.shard_speech import bench_layout, build

    with tempfile.TemporaryDirectory(prefix="ifw-fanout-") as tmp:
        speech = build(Path(tmp), bench_layout(args.minutes))
        print(f"audio: {speech.duration / 60:.1f} min of real speech ({len(speech.placed)} recordings); model "
              f"{args.model}, batch {args.batch_size}, {args.threads_per_shard} thread(s) per shard, "
              f"{os.cpu_count()} CPUs{', diarized' if args.diarize else ''}")  # fmt: skip
        results = []
        for n in counts:
            r = run(speech.path, n, args)
            results.append(r)
            print(f"  {n} shard(s): {r['wall_s']:.1f} s", file=sys.stderr)

    one = results[0]
    for r in results:
        r["speedup"] = one["wall_s"] / r["wall_s"]
        r["efficiency"] = r["speedup"] / r["shards"]
        r["wer_vs_1"] = jiwer.wer(normalize_text(one["text"]), normalize_text(r["text"])) if one["text"] else 0.0
    for r in results[1:]:
        r["differing_words_by_cut"] = words_differing_by_cut(one, r)
    # The serial part of one run: what every shard pays before decoding, and the merge.
    serial_s = one["before_decoding_s"] + one["merge_s"]
    fraction = serial_s / one["wall_s"]
    no_load = (one["before_decoding_s"] - one["load_s"] - one["spawn_s"] + one["merge_s"]) / one["wall_s"]

    print("\n| shards | used | wall s | speed-up | efficiency | ideal | before decoding s | merge s | WER vs 1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['shards']} | {r['used']} | {r['wall_s']:.1f} | {r['speedup']:.2f} | {r['efficiency']:.2f} "
              f"| {r['shards']} | {r['before_decoding_s']:.1f} | {r['merge_s']:.3f} | {r['wer_vs_1']:.4f} |")  # fmt: skip
    for r in results[1:]:
        where = ", ".join(f"{cut:.1f} s: {n}" for cut, n in r["differing_words_by_cut"])
        print(f"{r['shards']} shards: words differing from 1 shard, by nearest cut: {where or 'no cut'}")
    print(f"\nserial part (1 shard): {one['before_decoding_s']:.1f} s before decoding (process start "
          f"{one['spawn_s']:.1f} s, model load {one['load_s']:.1f} s, probe and cuts {one['cut_s']:.2f} s) + merge "
          f"{one['merge_s']:.3f} s = {serial_s:.1f} s of {one['wall_s']:.1f} s: serial fraction {fraction:.4f}")  # fmt: skip
    print(f"Amdahl: 1 h of audio on 8 GPUs: speed-up {amdahl(fraction, 8):.2f}x with this serial fraction "
          f"(efficiency {amdahl(fraction, 8) / 8:.2f}); {amdahl(no_load, 8):.2f}x where the model is already loaded "
          f"(a warm pool: serial fraction {no_load:.4f})")  # fmt: skip
    print(
        "  (a GPU decodes the parallel part much faster than this CPU, so there the same serial seconds are a "
        "larger fraction: measure with the same script on the GPU machine)"
    )
    title = f"{speech.duration / 60:.0f} min of real speech, {args.model}, {os.cpu_count()} CPUs"
    plot(results, fraction, args.png, title)
    print(f"plot: {args.png}")
    if args.json:
        args.json.write_text(json.dumps({"minutes": speech.duration / 60, "model": args.model, "results": results,
                                         "serial_fraction": fraction}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
