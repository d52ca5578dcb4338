"""Offline GPU benchmark: ifw's own decode path on randomly initialised Whisper models.

Nothing is downloaded: large-v3 and large-v3-turbo are built from their shapes (written below)
with random weights, the tokenizer is a synthetic byte-level BPE of Whisper's size, and the audio
is synthesised (speed depends on shapes, not on content). Each piece is 30 s of audio, decoded
through ifw.runner.decoding.decode_pieces to exactly --tokens tokens and then the end token
(forced: random weights never end), with the guards that would reject such text and the
temperature fallback off, so a batch is one generate() call: features (STFT on the device),
encoder once per piece, the no-speech/language step, the batched decoder, ifw's log-probability
bookkeeping and text; with word timestamps, ifw's alignment pass too (and the DTW, timed apart).

    python bench/gpu_bench.py                 # the GPU plan (H100: ~6 min), results under $OUT or bench/results/
    python bench/gpu_bench.py --dry-run       # print the plan and its estimated time
    python bench/gpu_bench.py --only 'turbo.*' --batches 64
    python bench/gpu_bench.py --tiny          # a tiny random model on this CPU (--quick: fewer tokens, as CI)
    python bench/gpu_bench.py --report DIR/results.jsonl   # table + plot again from a results file

Each configuration ("group": model.dtype.attention[.cache]) runs in its own child process with a
timeout and a clean environment; the child appends one JSON line per measurement as it goes, so
a crash or a timeout loses nothing already measured (the parent records it and goes on with the
points that are left). Needs only torch, transformers and numpy: where ifw's other dependencies
are missing (pydantic: bench/gpu_check.sh carries it as wheels), the modules of the decode path's
imports that need them (ifw.runner.errors, ifw.runner.audio; prometheus_client) get stand-ins
with the same names; every row says which ("ifw_import"). See bench/README.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16000
PIECE_S = 30.0

# WhisperConfig shapes (openai/whisper-large-v3 and -large-v3-turbo config.json); alignment heads
# as in their generation_config.json (OpenAI's / whisper.cpp's presets).
SHAPES = {
    "large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32, heads=20, ffn=5120,
                     alignment_heads=[[7, 0], [10, 17], [12, 18], [13, 12], [16, 1], [17, 14], [19, 11],
                                      [21, 4], [24, 1], [25, 6]]),
    "turbo": dict(d_model=1280, encoder_layers=32, decoder_layers=4, heads=20, ffn=5120,
                  alignment_heads=[[2, 4], [2, 11], [3, 3], [3, 6], [3, 11], [3, 14]]),
    "tiny": dict(d_model=64, encoder_layers=2, decoder_layers=2, heads=4, ffn=256, alignment_heads=[[1, 0], [1, 2]]),
}  # fmt: skip
# large-v3's vocabulary: 50257 text tokens, <|endoftext|>, <|startoftranscript|>, 100 languages,
# translate, transcribe, startoflm, startofprev, nospeech, notimestamps, 1501 timestamps = 51866.
LANGUAGES = ("en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr "
             "bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn "
             "yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su "
             "yue").split()  # fmt: skip
EOT = 50257
SOT = EOT + 1
TRANSLATE = SOT + 1 + len(LANGUAGES)
TRANSCRIBE, SOT_LM, SOT_PREV, NO_SPEECH, NO_TIMESTAMPS = range(TRANSLATE + 1, TRANSLATE + 6)
TIMESTAMP_BEGIN = NO_TIMESTAMPS + 1
VOCAB = TIMESTAMP_BEGIN + 1501
assert VOCAB == 51866

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
ATTN = {"sdpa": "sdpa", "fa2": "flash_attention_2"}
# ifw's dependencies beyond torch, transformers and numpy, which a lent GPU machine may lack:
# --hide-control-plane-deps imports ifw here as there, at worst.
CONTROL_PLANE_DEPS = ["pydantic", "pydantic_core", "pydantic_settings", "prometheus_client", "kubernetes",
                      "kopf", "fastapi", "starlette", "uvicorn", "boto3", "botocore", "tenacity", "standardwebhooks",
                      "multipart", "python_multipart", "dotenv", "annotated_types"]  # fmt: skip


@dataclass
class Group:
    model: str
    dtype: str
    attn: str = "sdpa"
    cache: str = "dynamic"  # dynamic | static (static cache, no compile) | compile (static cache + torch.compile)
    points: list[tuple[int, str]] = field(default_factory=list)  # (batch, "chunk" | "word")

    @property
    def name(self) -> str:
        return f"{self.model}.{self.dtype}.{self.attn}" + ("" if self.cache == "dynamic" else f".{self.cache}")


C, W = "chunk", "word"
# In priority order: with --deadline, what does not fit is skipped from the end.
GPU_PLAN = [
    Group("large-v3", "fp16", points=[(8, C), (24, C), (64, C), (128, C), (24, W), (64, W)]),
    Group("turbo", "fp16", points=[(8, C), (24, C), (64, C), (128, C), (64, W)]),
    Group("large-v3", "bf16", points=[(64, C)]),
    Group("large-v3", "fp16", "fa2", points=[(24, C), (64, C), (128, C)]),
    Group("turbo", "fp16", "fa2", points=[(64, C), (128, C)]),
    Group("large-v3", "fp16", cache="static", points=[(64, C)]),
    Group("turbo", "bf16", points=[(64, C)]),
    Group("large-v3", "fp16", cache="compile", points=[(64, C)]),
]
TINY_PLAN = [
    Group("tiny", "fp32", points=[(2, C), (4, C), (2, W)]),
    Group("tiny", "fp32", cache="static", points=[(2, C)]),
]

# Rough H100 costs (s) for the printed estimate: encoder per piece, decoder step overhead, and per
# row per step (reading the cross-attention keys/values: 245 MB a row for large-v3); child start.
COST = {
    "large-v3": dict(piece=0.008, step=0.028, row=0.00009, start=20.0),
    "turbo": dict(piece=0.008, step=0.006, row=0.000012, start=15.0),
    "tiny": dict(piece=0.02, step=0.004, row=0.0002, start=8.0),  # this CPU
}
WARMUP_TOKENS = 16
COMPILE_S = 120.0


def estimate(group: Group, tokens: int, repeats: int) -> float:
    c = COST[group.model]
    total = c["start"]
    for batch, ts in group.points:
        run = batch * c["piece"] + tokens * (c["step"] + batch * c["row"]) * (1.3 if ts == W else 1.0)
        warm = run if group.cache != "dynamic" else batch * c["piece"] + WARMUP_TOKENS * c["step"]
        total += warm + repeats * run
    return total + (COMPILE_S if group.cache == "compile" else 0.0)


# ---------------------------------------------------------------- the child: one group, one process


def hide_modules(names: list[str]) -> None:
    """Make these imports fail as on a machine without them (find_spec answers None too)."""
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]


class _Null:
    """prometheus_client's stand-in: every metric, label and update is a no-op (a decorator returns its function)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# Third-party modules that only observe (metrics): where missing, served by _Null.
NULL_MODULES = ("prometheus_client",)


def _stand_in(name: str) -> types.ModuleType:
    """A stand-in for a module of the decode path's imports that needs what this machine lacks."""
    mod = types.ModuleType(name)
    if name.split(".")[0] in NULL_MODULES:

        def null(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Null()

        mod.__getattr__ = null
    elif name == "ifw.runner.errors":  # the error classes by the names imported: InvalidSpec, OutOfMemory, ...
        mod.RunnerError = type("RunnerError", (Exception,), {})

        def error_class(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            cls = type(attr, (mod.RunnerError,), {"__module__": name})
            setattr(mod, attr, cls)
            return cls

        mod.__getattr__ = error_class
    elif name == "ifw.runner.audio":
        mod.SAMPLE_RATE = SAMPLE_RATE
    return mod


def import_decode_path():
    """ifw.runner.decoding and .models from this tree, and what stood in for modules it could not import.

    Where a third-party module is missing (the lent GPU machine has torch and transformers only), the
    ifw modules that need it (errors: pydantic via ifw.core.contract; audio: httpx, pydantic-settings)
    or the metrics library are replaced by stand-ins, then the import is tried again.
    """
    import importlib

    ifw = types.ModuleType("ifw")  # the tree's folders are ifw's subpackages (pyproject's package-dir)
    ifw.__path__ = [str(ROOT)]
    sys.modules["ifw"] = ifw
    stand_ins: list[str] = []
    missing: list[str] = []
    while True:
        try:
            decoding = importlib.import_module("ifw.runner.decoding")
            models = importlib.import_module("ifw.runner.models")
            break
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if top == "ifw" or top in missing:
                raise
            missing.append(top)
        for name in [m for m in sys.modules if m.startswith("ifw.")]:  # half-imported modules
            del sys.modules[name]
        for name in [missing[-1]] if missing[-1] in NULL_MODULES else ["ifw.runner.errors", "ifw.runner.audio"]:
            if name not in stand_ins:
                stand_ins.append(name)
        for name in stand_ins:
            sys.modules[name] = _stand_in(name)
    how = f"stand-ins for {', '.join(stand_ins)} ({', '.join(missing)} missing)" if stand_ins else "real"
    return decoding, models, how


def synthetic_tokenizer():
    """A byte-level BPE of Whisper's size and special tokens (the weights are random: text is noise)."""
    import random

    from transformers import WhisperTokenizer

    # GPT-2's byte-to-character table: printable bytes stand for themselves, the rest from U+0100 on
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    alphabet = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tokens, merges, rng = list(alphabet), [], random.Random(0)
    while len(tokens) < EOT:
        a, b = tokens[rng.randrange(min(len(tokens), 4096))], tokens[rng.randrange(256)]
        if a + b not in vocab:
            vocab[a + b] = len(tokens)
            tokens.append(a + b)
            merges.append((a, b))
    tok = WhisperTokenizer(vocab=vocab, merges=merges)
    specials = ["<|endoftext|>", "<|startoftranscript|>", *[f"<|{lang}|>" for lang in LANGUAGES], "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]  # fmt: skip
    tok.add_tokens(specials, special_tokens=True)
    tok.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    assert len(tok) == VOCAB and tok.convert_tokens_to_ids("<|notimestamps|>") == NO_TIMESTAMPS, len(tok)
    return tok


def build_whisper(models, shape: str, dtype: str, attn: str, device, processor):
    """A WhisperModel (ifw's) of the shape, random weights, initialised on the device.

    The attention is switched on and proven as ifw.runner.models.load_model does it (without a
    fallback: an attention that does not run here is an error).
    """
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration
    from transformers.models.whisper.configuration_whisper import NON_SPEECH_TOKENS_MULTI

    s = SHAPES[shape]
    suppress = sorted({t for t in NON_SPEECH_TOKENS_MULTI if t < EOT} | {SOT, TRANSLATE, TRANSCRIBE, SOT_LM,
                                                                          SOT_PREV, NO_SPEECH})  # fmt: skip
    config = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=128, d_model=s["d_model"], encoder_layers=s["encoder_layers"],
        decoder_layers=s["decoder_layers"], encoder_attention_heads=s["heads"], decoder_attention_heads=s["heads"],
        encoder_ffn_dim=s["ffn"], decoder_ffn_dim=s["ffn"], max_source_positions=1500, max_target_positions=448,
        decoder_start_token_id=SOT, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT,
    )  # fmt: skip
    torch_dtype = getattr(torch, DTYPES[dtype])
    with torch.device(device):
        model = WhisperForConditionalGeneration._from_config(config, dtype=torch_dtype, attn_implementation="sdpa")
    model.to(device).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=SOT, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT, max_length=448,
        begin_suppress_tokens=[220, EOT], suppress_tokens=suppress, is_multilingual=True, task="transcribe",
        lang_to_id={f"<|{lang}|>": SOT + 1 + i for i, lang in enumerate(LANGUAGES)},
        task_to_id={"translate": TRANSLATE, "transcribe": TRANSCRIBE}, no_timestamps_token_id=NO_TIMESTAMPS,
        prev_sot_token_id=SOT_PREV, max_initial_timestamp_index=50, alignment_heads=s["alignment_heads"],
        return_timestamps=False,
    )  # fmt: skip
    # what ifw.runner.models.load_model does to a loaded model, where this tree has it
    if hasattr(models, "_keep_suppression_masks"):
        models._keep_suppression_masks(model)
    whisper = models.WhisperModel(shape, f"random-init:{shape}", model, processor, torch.device(device), torch_dtype)
    if hasattr(models, "choose_attention"):
        whisper.attention = models.choose_attention(whisper, [ATTN[attn]])
    else:
        model.set_attn_implementation(ATTN[attn])
    return whisper


def make_clips(n: int):
    """n distinct 30 s speech-like clips (voiced harmonics in syllables, a little noise); the cost of
    every step, the STFT included, depends on the length alone."""
    import numpy as np

    t = np.arange(int(PIECE_S * SAMPLE_RATE)) / SAMPLE_RATE
    clips = []
    for i in range(n):
        rng = np.random.default_rng(i)
        f0 = 110 + 40 * rng.random() + 20 * np.sin(2 * np.pi * 0.3 * t + i)
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
        syllables = np.clip(np.sin(2 * np.pi * (3 + rng.random()) * t), 0, None) ** 2
        clips.append((0.1 * voiced * syllables + 0.005 * rng.standard_normal(len(t))).astype(np.float32))
    return clips


def child(spec: dict) -> None:
    hide_modules(spec.get("hide", []))
    decoding, models, how = import_decode_path()
    import dataclasses

    import torch
    import transformers

    group = Group(
        **{k: spec[k] for k in ("model", "dtype", "attn", "cache")}, points=[tuple(p) for p in spec["points"]]
    )
    device = spec["device"] if spec["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    if not cuda and spec.get("cpu_threads"):
        torch.set_num_threads(spec["cpu_threads"])
    tokens, out = spec["tokens"], Path(spec["out"])
    align = sys.modules.get("ifw.runner.alignment")  # word timestamps: ifw's own pass + DTW
    base = {"group": group.name, "model": group.model, "dtype": group.dtype, "attn": group.attn,
            "cache": group.cache, "tokens": tokens, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "ifw_import": how}  # fmt: skip

    def emit(row: dict) -> None:
        append_row(out, {**base, **row})

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        from transformers import WhisperFeatureExtractor, WhisperProcessor

        processor = WhisperProcessor(WhisperFeatureExtractor(feature_size=128), synthetic_tokenizer())
        if cuda:
            torch.zeros(1, device=device)  # the CUDA context is not the model's load time
        t0 = time.perf_counter()
        whisper = build_whisper(models, group.model, group.dtype, group.attn, device, processor)
        sync()
    except Exception as e:
        for batch, ts in group.points:
            emit({"batch": batch, "timestamps": ts, "status": "error", "error": f"model init: {e!r}"[:2000]})
        return
    base["init_s"] = round(time.perf_counter() - t0, 3)
    base["params_m"] = round(sum(p.numel() for p in whisper.model.parameters()) / 1e6, 1)
    gc = whisper.model.generation_config
    models.use_decoder_cache(whisper, group.cache)  # IFW_DECODER_CACHE's settings, as the runner applies them
    # Fixed work per piece: exactly `tokens` tokens, then the end token (forced: the weights are
    # random); guards that would reject it off, one temperature (no fallback decodes), no loop scan.
    gc.forced_eos_token_id = whisper.eot
    fields = {f.name for f in dataclasses.fields(decoding.DecodeOptions)}
    options = dataclasses.replace(decoding.DEFAULT_OPTIONS, **{k: v for k, v in dict(
        tokens_per_second=10**6, temperature_step=2.0, loop_min_tokens=10**9, compression_ratio_threshold=math.inf,
        logprob_threshold=-math.inf).items() if k in fields})  # fmt: skip
    clips = make_clips(min(16, max(b for b, _ in group.points)))

    def decode(batch: int, ts: str, n_tokens: int):
        gc.min_new_tokens = n_tokens
        opts = dataclasses.replace(options, max_new_tokens=n_tokens + 1)
        reqs = [decoding.PieceRequest(clips[i % len(clips)], language="en", word_timestamps=ts == W)
                for i in range(batch)]  # fmt: skip
        stats = decoding.DecodeStats()
        sync()
        start = time.perf_counter()
        results = decoding.decode_pieces(whisper, reqs, batch_size=batch, stats=stats, options=opts)
        sync()
        wall = time.perf_counter() - start
        # word timestamps: the DTW that the job's thread runs on each piece's alignment matrix
        start = time.perf_counter()
        timed = sum(len(align.token_times(r.alignment, len(r.tokens))) == len(r.tokens)
                    for r in results if getattr(r, "alignment", None) is not None)  # fmt: skip
        return wall, time.perf_counter() - start, results, stats, timed

    for batch, ts in group.points:
        row = {"batch": batch, "timestamps": ts}
        if ts == W:
            row["word_path"] = "ifw.runner.alignment" if align else "generate(return_token_timestamps)"
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            warm = 2 if group.cache == "compile" else 1  # CUDA graphs are recorded on a later call
            for _ in range(warm):  # a static cache is sized by the token budget: warm with the same one
                decode(batch, ts, tokens if group.cache != "dynamic" else min(tokens, WARMUP_TOKENS))
            walls, dtws, lengths, verdicts, calls, halvings, timed = [], [], set(), set(), set(), 0, set()
            for _ in range(spec["repeats"]):
                wall, dtw, results, stats, n_timed = decode(batch, ts, tokens)
                walls.append(round(wall, 4))
                dtws.append(round(dtw, 4))
                lengths |= {len(r.tokens) for r in results}
                verdicts |= {r.verdict for r in results}
                calls.add(stats.generate_calls)
                halvings += stats.oom_halvings
                timed.add(n_timed)
            wall = statistics.median(walls)
            row |= {"status": "ok", "wall_s": round(wall, 4), "walls": walls, "audio_s": batch * PIECE_S,
                    "rtfx": round(batch * PIECE_S / wall, 2), "tokens_min": min(lengths), "tokens_max": max(lengths),
                    "verdicts": sorted(verdicts), "generate_calls": sorted(calls), "oom_halvings": halvings,
                    "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}  # fmt: skip
            if ts == W:
                row |= {"dtw_s": max(dtws), "word_timed_pieces": min(timed)}
        except Exception as e:  # an unsupported combination is a result, not the end of the run
            row |= {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}
            if type(e).__name__ == "DeviceFailed" or "CUDA error" in str(e):
                emit(row)
                raise SystemExit(3) from None  # this process's CUDA context is gone: the rest need a new one
        emit(row)
        print(f"  {group.name} b{batch} {ts}: {row.get('rtfx', row.get('error'))}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the parent: plan, children, report


def child_env() -> dict:
    """The parent's environment without thread caps and test settings; offline."""
    drop = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "CUDA_LAUNCH_BLOCKING",
            "PYTORCH_NO_CUDA_MEMORY_CACHING", "IFW_CPU_THREADS")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PYTEST_", "COV_"))}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                  "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}  # fmt: skip


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            pass
    return rows


def append_row(path: Path, row: dict) -> None:
    """One JSON line, on disk before this returns (a line cut by a crash stays on its own line)."""
    cut = path.exists() and path.stat().st_size > 0 and path.read_bytes()[-1:] != b"\n"
    with path.open("ab") as f:
        f.write(("\n" if cut else "").encode() + json.dumps({**row, "time": time.time()}).encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


_running: list[subprocess.Popen] = []


def _die_with_parent():
    """ifw.core.processes' preexec_fn (stdlib only, so loaded by path even where ifw's other
    dependencies are missing): a child in its own session still ends when this process is SIGKILLed."""
    spec = importlib.util.spec_from_file_location("_ifw_processes", ROOT / "core" / "processes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.die_with_parent


die_with_parent = _die_with_parent()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _on_signal(signum, frame) -> None:
    """Stopped from outside (an outer timeout): end the child's process group too."""
    for proc in list(_running):
        _kill(proc)
    raise SystemExit(128 + signum)


def run_group(group: Group, args, jsonl: Path, log: Path, deadline: float) -> None:
    ident = {"group": group.name, "model": group.model, "dtype": group.dtype, "attn": group.attn, "cache": group.cache}
    points, why = list(group.points), ""
    for _ in range(3):  # a crash costs the point it was at; the rest get a fresh child
        if not points:
            return
        est = estimate(Group(group.model, group.dtype, group.attn, group.cache, points), args.tokens, args.repeats)
        left = deadline - time.monotonic()
        if est > left + 30:
            why = f"skipped: estimated {est:.0f} s, {max(0, left):.0f} s left of --deadline"
            break
        spec = {**ident, "points": points, "tokens": args.tokens, "repeats": args.repeats, "device": args.device,
                "out": str(jsonl), "hide": args.hide, "cpu_threads": args.cpu_threads}  # fmt: skip
        timeout = min(max(120.0, 3 * est), left + 30)
        print(f"{group.name}: {len(points)} points, ~{est:.0f} s (timeout {timeout:.0f} s)", flush=True)
        t0 = time.monotonic()
        with log.open("ab") as err:
            err.write(f"==== {group.name} {points}\n".encode())
            err.flush()
            start = err.tell()
            # its own process group: a timeout also ends what it started (torch.compile's workers)
            # (and PR_SET_PDEATHSIG: a SIGKILLed parent cannot end it, so the kernel does)
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                    stdout=err, stderr=err, env=child_env(), cwd=ROOT, start_new_session=True,
                                    preexec_fn=die_with_parent)  # fmt: skip
            _running.append(proc)
            try:
                rc = proc.wait(timeout=timeout)
                why = f"child exited {rc}"
            except subprocess.TimeoutExpired:
                _kill(proc)
                rc, why = -1, f"child timed out after {timeout:.0f} s"
            finally:
                _running.remove(proc)
        print(f"{group.name}: {time.monotonic() - t0:.0f} s", flush=True)
        done = {(r["batch"], r["timestamps"]) for r in read_rows(jsonl) if r.get("group") == group.name}
        points = [p for p in points if tuple(p) not in done]
        if not points or rc == 3:  # 3: the child wrote its row for a broken CUDA context and left
            continue
        with log.open("rb") as f:  # the end of what this child printed
            f.seek(max(start, log.stat().st_size - 1500))
            tail = f.read().decode(errors="replace")
        batch, ts = points.pop(0)
        append_row(jsonl, {**ident, "batch": batch, "timestamps": ts, "status": "error", "error": f"{why}: {tail}"})
    for batch, ts in points:
        append_row(jsonl, {**ident, "batch": batch, "timestamps": ts, "status": "skipped" if "skipped" in why
                           else "error", "error": why or "children crashed three times"})  # fmt: skip


def _notes(r: dict) -> str:
    notes = []
    if r.get("timestamps") == W:
        notes.append(f"{r.get('word_path')}: DTW {r.get('dtw_s', 0):.2f} s, {r.get('word_timed_pieces')} pieces timed")
    if r.get("generate_calls", [1]) != [1]:
        notes.append(f"generate calls {r['generate_calls']}")
    if r.get("oom_halvings"):
        notes.append(f"OOM halvings {r['oom_halvings']}")
    if r.get("verdicts", ["ok"]) != ["ok"]:
        notes.append(f"verdicts {r['verdicts']}")
    return "; ".join(notes)


def report(jsonl: Path, dest: Path) -> str:
    """summary.md (and rtfx.png where matplotlib is installed) next to the results; returns the markdown."""
    rows = read_rows(jsonl)
    lines = ["| config | timestamps | batch | RTFx | wall s | tokens/piece | peak GPU GB | load s | notes |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r.get("group", ""), r.get("timestamps", ""), r.get("batch", 0))):
        if r.get("status") == "ok":
            toks = (
                str(r["tokens_min"]) if r["tokens_min"] == r["tokens_max"] else f"{r['tokens_min']}-{r['tokens_max']}"
            )
            peak = "-" if r["peak_gpu_gb"] is None else r["peak_gpu_gb"]
            lines.append(f"| {r['group']} | {r['timestamps']} | {r['batch']} | {r['rtfx']:.1f} | {r['wall_s']:.2f} | "
                         f"{toks} | {peak} | {r.get('init_s', '-')} | {_notes(r)} |")  # fmt: skip
        else:
            msg = " ".join(str(r.get("error", "")).split())[:200].replace("|", "/")
            lines.append(f"| {r.get('group')} | {r.get('timestamps')} | {r.get('batch')} | - | - | - | - | - | "
                         f"**{r.get('status')}**: {msg} |")  # fmt: skip
    ok = [r for r in rows if r.get("status") == "ok"]
    first = ok[0] if ok else {}
    target = [r for r in ok if (r["model"], r["dtype"], r["batch"], r["timestamps"]) == ("large-v3", "fp16", 64, C)]
    verdict = ", ".join(f"{r['group']} {r['rtfx']:.0f}x" for r in target) or "not measured"
    head = [f"# ifw GPU benchmark: random weights, {first.get('tokens', '?')} tokens per 30 s piece", "",
            f"device: {first.get('device', '?')}; torch {first.get('torch', '?')}, transformers "
            f"{first.get('transformers', '?')}; ifw import: {first.get('ifw_import', '?')}", "",
            "RTFx = audio seconds / wall seconds of ifw's decode_pieces (features, encoder, decode, bookkeeping). "
            "The original: 150 min in 98 s on an A100 (~92x; large-v3 fp16 FlashAttention-2 batch 24). "
            "Target: >= 600x for large-v3 fp16 batch 64 chunk timestamps on one H100.", "",
            f"**large-v3 fp16 batch 64 chunk: {verdict}**", ""]  # fmt: skip
    text = "\n".join(head + lines) + "\n"
    (dest / "summary.md").write_text(text)
    plot(rows, dest / "rtfx.png")
    return text


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            series.setdefault(f"{r['group']} {r['timestamps']}", []).append((r["batch"], r["rtfx"]))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([b for b, _ in pts], [x for _, x in pts], marker="o", label=label)
    ax.axhline(600, color="grey", linestyle="--", linewidth=1, label="target 600x (large-v3 fp16 b64 chunk)")
    ax.axhline(92, color="grey", linestyle=":", linewidth=1, label="original on A100 ~92x")
    ax.set_xscale("log", base=2)
    batches = sorted({b for pts in series.values() for b, _ in pts})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch (30 s pieces per generate call)")
    ax.set_ylabel("RTFx (audio s / wall s)")
    first = next(r for r in rows if r.get("status") == "ok")
    ax.set_title(f"ifw decode path, random weights, {first['tokens']} tokens/piece, {first['device']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def select(plan: list[Group], args) -> list[Group]:
    only = [p for p in (args.only or "").split(",") if p]
    batches = {int(b) for b in args.batches.split(",")} if args.batches else None
    chosen = []
    for g in plan:
        if only and not any(fnmatch.fnmatch(g.name, p) or p in g.name.split(".") for p in only):
            continue
        pts = [(b, ts) for b, ts in g.points
               if (batches is None or b in batches) and (args.timestamps in (None, ts))]  # fmt: skip
        if pts:
            chosen.append(Group(g.model, g.dtype, g.attn, g.cache, pts))
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny random model on this machine's CPU (seconds)")
    p.add_argument("--quick", action="store_true", help="as make bench-quick: --tiny --tokens 24 --repeats 1, 1 thread")
    p.add_argument(
        "--only", help="comma-separated groups: globs on model.dtype.attn[.cache] or one part, e.g. turbo,fa2"
    )
    p.add_argument("--batches", help="only these batch sizes, e.g. 24,64")
    p.add_argument("--timestamps", choices=[C, W], help="only chunk or only word timestamps")
    p.add_argument("--tokens", type=int, default=128, help="new tokens decoded per piece (default 128)")
    p.add_argument("--repeats", type=int, default=2, help="timed decodes per point, after one warm-up (default 2)")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    p.add_argument("--deadline", type=float, default=None, help="seconds for the whole run (default 390; --tiny: none)")
    p.add_argument("--cpu-threads", type=int, help="torch threads of a CPU run (default: torch's own choice)")
    p.add_argument("--out", type=Path, help="results folder (default $OUT/gpu-bench, else bench/results/gpu-<time>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time, run nothing")
    p.add_argument("--report", type=Path, help="write the table and plot again from a results.jsonl")
    p.add_argument("--hide-control-plane-deps", dest="hide", action="store_const", const=CONTROL_PLANE_DEPS,
                   default=[], help="import ifw as on the lent GPU machine: without pydantic & co.")  # fmt: skip
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.quick:
        args.tiny, args.tokens, args.repeats, args.cpu_threads = True, 24, 1, args.cpu_threads or 1
    if args.report:
        print(report(args.report, args.report.parent))
        return 0

    plan = select(TINY_PLAN if args.tiny else GPU_PLAN, args)
    if not args.tiny and not importlib.util.find_spec("flash_attn"):
        plan = [g for g in plan if g.attn != "fa2"]  # measured only where installed
        print("flash_attn is not installed: the fa2 groups are left out", flush=True)
    if args.deadline is None:
        args.deadline = math.inf if args.tiny else 390.0
    ests = [estimate(g, args.tokens, args.repeats) for g in plan]
    print(f"plan: {len(plan)} groups, {sum(len(g.points) for g in plan)} points, {args.tokens} tokens/piece, "
          f"1 warm-up + {args.repeats} timed each; estimated {sum(ests):.0f} s"
          + ("" if args.tiny else " on an H100"))  # fmt: skip
    for g, e in zip(plan, ests):
        print(f"  {g.name:28s} ~{e:5.0f} s  " + " ".join(f"{b}{'w' if ts == W else ''}" for b, ts in g.points))
    if args.dry_run or not plan:
        return 0

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or (
        Path(os.environ["OUT"]) / "gpu-bench" if os.environ.get("OUT") else ROOT / "bench" / "results" / f"gpu-{stamp}"
    )
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "results.jsonl"
    for old in (jsonl, out / "children.log"):  # an earlier run's rows would count as measured
        if old.exists():
            old.rename(old.with_name(f"{old.stem}-before-{stamp}{old.suffix}"))
    (out / "plan.json").write_text(json.dumps({"argv": sys.argv[1:], "groups": [asdict(g) for g in plan],
                                               "estimated_s": round(sum(ests))}, indent=1))  # fmt: skip
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    start = time.monotonic()
    deadline = start + args.deadline
    for g in plan:
        run_group(g, args, jsonl, out / "children.log", deadline)
    print(f"\ntotal {time.monotonic() - start:.0f} s (estimated {sum(ests):.0f} s); results in {out}\n")
    print(report(jsonl, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
