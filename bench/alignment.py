"""Word timestamps: transformers' path (before) against ifw.runner.alignment (after), in one run.

1. DTW per row of large-v3's shape (150 tokens x 1500 frames): transformers' pure-Python
   `_dynamic_time_warping` against `alignment.dtw`, on the same random matrices; the paths must
   be equal.
2. Real speech (../shared/speech: the Harvard conversation, ~33 s in two pieces, and the ten
   sentences as ten more pieces) through `asr.transcribe` with `timestamp: chunk` and
   `timestamp: word`, per model: wall time, and the word/chunk ratio before and after.
   "before" is the decode as it was (generate(return_token_timestamps=True): eager attention,
   every step's cross-attention kept, the DTW of every row inside generate()), reimplemented
   here only; "after" is the product. Each mode runs --repeat times, interleaved; its fastest
   run counts (other load on a shared machine only slows a run down). Then the words of both:
   the same texts, and start/end within one 20 ms frame? The paths of the real alignment
   matrices are checked against transformers' DTW too.

    .venv/bin/python -m bench.alignment [--models tiny.en,base] [--repeat 3] [--device cpu]
    .venv/bin/python -m bench.alignment --quick   # seconds: tiny.en, two sentences, once (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAME = 0.02


def dtw_figures(rows: int, reference_rows: int) -> None:
    import numpy as np
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping

    from ifw.runner import alignment

    rng = np.random.default_rng(0)
    matrices = [rng.standard_normal((150, 1500)).astype(np.float32) for _ in range(max(rows, reference_rows))]
    alignment.dtw(matrices[0])  # warm
    ours, theirs, same = [], [], True
    for m in matrices[:rows]:
        t = time.perf_counter()
        path = alignment.dtw(m)
        ours.append(time.perf_counter() - t)
    for m in matrices[:reference_rows]:
        t = time.perf_counter()
        ref = _dynamic_time_warping(m.astype(np.float64))
        theirs.append(time.perf_counter() - t)
        path = alignment.dtw(m)
        same &= all(np.array_equal(a, b) for a, b in zip(ref, path, strict=True))
    a, b = 1e3 * float(np.median(theirs)), 1e3 * float(np.median(ours))
    print(f"DTW per row (150 x 1500): transformers {a:.1f} ms, ifw {b:.2f} ms (median of {len(theirs)} / "
          f"{len(ours)}; fastest ifw {1e3 * min(ours):.2f} ms), {a / b:.0f}x faster, same path: "
          f"{'yes' if same else 'NO'}")  # fmt: skip
    if not same:
        raise SystemExit("the DTW paths differ from transformers'")


def _old_decode_chunk(whisper, states, options):
    """decoding._decode_chunk as it was: generate(return_token_timestamps=True) (the bench's "before")."""
    import torch

    from ifw.runner import decoding as d

    request, temperature = states[0].request, states[0].temperature
    kwargs, recorder, rows, _ = d.generate_inputs(whisper, states, options)
    if request.word_timestamps:
        kwargs["return_token_timestamps"] = True
    attn = whisper.model.config._attn_implementation
    try:
        with torch.inference_mode(), d._seeded(whisper.device, temperature > 0, options.sampling_seed):
            out = whisper.model.generate(**kwargs)
    finally:
        whisper.model.config._attn_implementation = attn
    prefix = recorder.prefix
    ids = recorder.ids[:, prefix:].tolist()
    logprobs = torch.stack(recorder.logprobs, dim=1).tolist()
    times = out["token_timestamps"][:, prefix:].tolist() if request.word_timestamps else None
    candidates = []
    for p in range(len(states)):
        samples = []
        for r in range(p * rows, (p + 1) * rows):
            c = d._candidate(whisper, ids[r], logprobs[r], temperature, options)
            if times:
                n = len(c.tokens)
                t = times[r][:n]
                c.alignment = _Times(t + [t[-1] if t else 0.0] * (n - len(t)))
            samples.append(c)
        passing = [c for c in samples if c.passes(options)] or samples
        candidates.append(max(passing, key=lambda c: c.avg_logprob))
    return candidates


class _Times(list):
    """Token times the old path computed, carried where the product carries its matrix."""


@contextlib.contextmanager
def before():
    from ifw.runner import alignment, decoding

    chunk, times = decoding._decode_chunk, alignment.token_times
    decoding._decode_chunk = _old_decode_chunk
    alignment.token_times = lambda m, n: list(m) if isinstance(m, _Times) else times(m, n)
    try:
        yield
    finally:
        decoding._decode_chunk, alignment.token_times = chunk, times


@contextlib.contextmanager
def catching_matrices(into: list):
    from ifw.runner import alignment

    times = alignment.token_times

    def token_times(m, n):
        into.append(m)
        return times(m, n)

    alignment.token_times = token_times
    try:
        yield
    finally:
        alignment.token_times = times


def speech_figures(name: str, clips: list, repeat: int, device: str, batch_size: int, warm: tuple[str, ...]) -> None:
    import numpy as np
    from transformers.models.whisper.generation_whisper import _dynamic_time_warping

    from ifw.runner import alignment, asr, models
    from ifw.runner.config import RunnerSettings

    whisper = models.load_model(name, RunnerSettings(default_model=name, device=device, cpu_threads=2))
    seconds = sum(len(c) for c in clips) / 16000

    matrices: list = []  # the product's alignment matrices, of its last run

    def run(mode: str):
        timestamp = "chunk" if mode == "chunk" else "word"
        if mode == "after":
            matrices.clear()
        ctx = before() if mode == "before" else catching_matrices(matrices)
        with ctx:
            t = time.perf_counter()
            out = [asr.transcribe(c, whisper, timestamp=timestamp, batch_size=batch_size, language="en") for c in clips]
            return time.perf_counter() - t, out

    for mode in warm:  # the first calls load the VAD and warm the kernels
        run(mode)
    best: dict[str, float] = {}
    words: dict[str, list] = {}
    for _ in range(repeat):
        for mode in ("chunk", "after", "before"):
            wall, out = run(mode)
            best[mode] = min(best.get(mode, wall), wall)
            words[mode] = [w for t in out for s in t.segments for w in (s.words or [])]
    chunk = best["chunk"]
    print(f"{name} ({device}, {len(clips)} clips, {seconds:.1f} s of speech, fastest of {repeat}): "
          f"chunk {chunk:.2f} s | word before {best['before']:.2f} s ({best['before'] / chunk:.2f}x chunk) | "
          f"word after {best['after']:.2f} s ({best['after'] / chunk:.2f}x chunk)")  # fmt: skip
    old, new = words["before"], words["after"]
    same_text = [w.text for w in old] == [w.text for w in new]
    diffs = [max(abs(a.start - b.start), abs(a.end - b.end)) for a, b in zip(old, new, strict=False)]
    within = sum(d <= FRAME + 1e-6 for d in diffs)
    exact = sum(d <= 1e-6 for d in diffs)
    print(f"{name} words: {len(new)} after, {len(old)} before, same texts: {'yes' if same_text else 'NO'}; "
          f"times equal {exact}/{len(new)}, within one frame {within}/{len(new)}, "
          f"max diff {max(diffs, default=0.0):.3f} s")  # fmt: skip
    same = all(
        all(np.array_equal(a, b) for a, b in zip(_dynamic_time_warping(-m.astype(np.float64)), alignment.dtw(-m), strict=True))
        for m in matrices if m.size
    )  # fmt: skip
    rows = sum(m.shape[0] for m in matrices)
    print(f"{name} real alignment matrices: {len(matrices)} pieces, {rows} token rows, same DTW path as transformers: "
          f"{'yes' if same else 'NO'}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny.en,base")
    p.add_argument("--repeat", type=int, default=3, help="runs of each mode, interleaved; the fastest counts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="tiny.en, two Harvard sentences, once (seconds)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from tests.runner.conftest import harvard_conversation, harvard_sentences, read_wav

    if args.quick:
        dtw_figures(rows=5, reference_rows=1)
        clips = [read_wav(s.path) for s in harvard_sentences()[:2]]
        speech_figures("tiny.en", clips, 1, args.device, args.batch_size, warm=("chunk",))
        return
    dtw_figures(rows=50, reference_rows=5)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        clips = [harvard_conversation(Path(tmp)).audio()] + [read_wav(s.path) for s in harvard_sentences()]
        for name in args.models.split(","):
            speech_figures(name, clips, args.repeat, args.device, args.batch_size, warm=("chunk", "after", "before"))


if __name__ == "__main__":
    main()
