"""The runner's command line (console script `ifw-runner`).

    ifw-runner transcribe <file-or-url> [--model M] [--language L] [--task transcribe|translate]
                          [--batch-size N] [--timestamp chunk|word] [--prompt TEXT] [--temperature T]
                          [--hotwords TERM ...] [--vad-threshold P] [--vad-prefix-padding-ms MS]
                          [--vad-silence-duration-ms MS] [--diarize]
                          [--num-speakers N | --min-speakers N --max-speakers N]
                          [--shards N [--threads-per-shard T] [--min-shard-seconds S]]
                          [--format json|text|srt|vtt|verbose_json|diarized_json] [--output FILE]
                          [--device auto|cpu|cuda] [--dtype auto|float32|float16|bfloat16]
    ifw-runner job        # inside the runner Pod: run the TranscriptionJob named by IFW_JOB_*
    ifw-runner serve      # a warm pool worker: hold the models, take assigned jobs (IFW_WORKER_*)

`transcribe` runs the same pipeline as the Pod (ifw.runner.pipeline.run) and
prints the result to stdout unless --output is given. diarized_json is OpenAI's speaker
segments (as the gateway's /v1 answers it) and turns on --diarize. When stderr is a
terminal, a progress bar there shows the audio seconds done of the total and the speed.

Default model: --model, else IFW_DEFAULT_MODEL when set, else (on CUDA, or
when the hub cache holds it) the configured default (openai/whisper-large-v3),
else the packaged multilingual "base": it needs no download, detects the
language and can translate (the packaged "tiny.en" is ~2x faster, English only).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ifw.core.formats import FORMATS
from ifw.crds.transcriptionjob import AudioSource, TranscriptionJobSpec

CPU_FALLBACK_MODEL = "base"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ifw-runner", description="Insanely Fast Whisper runner")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("transcribe", help="transcribe a local file or an http(s) URL")
    t.add_argument("source", help="audio/video file path or http(s) URL")
    t.add_argument("--model", help="packaged name (tiny.en, base), local folder, or hub id")
    t.add_argument("--language", help="spoken language code (e.g. en); default: detect")
    t.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    t.add_argument("--batch-size", type=int, default=24, help="≤30 s pieces decoded at once (default 24)")
    t.add_argument("--timestamp", choices=["chunk", "word"], default="chunk")
    t.add_argument("--prompt", help="text every piece is conditioned on: names, spellings, vocabulary, style")
    t.add_argument("--temperature", type=float, help="of the first decode (default 0, greedy); failed pieces "
                   "are decoded again at +0.2 steps up to 1")  # fmt: skip
    t.add_argument("--hotwords", nargs="+", action="extend", metavar="TERM",
                   help="terms to prefer (names, jargon), placed before the prompt of every piece")  # fmt: skip
    t.add_argument("--vad-threshold", type=float, metavar="P", help="speech probability above which audio is "
                   "speech (default 0.5; higher for noisy audio)")  # fmt: skip
    t.add_argument("--vad-prefix-padding-ms", type=int, metavar="MS", help="audio kept around each stretch of "
                   "speech (default 200)")  # fmt: skip
    t.add_argument("--vad-silence-duration-ms", type=int, metavar="MS", help="shortest pause that ends a stretch "
                   "of speech (default 500; lower for fast talkers)")  # fmt: skip
    t.add_argument("--diarize", action="store_true", help="split by speaker (pyannote)")
    t.add_argument("--num-speakers", type=int)
    t.add_argument("--min-speakers", type=int)
    t.add_argument("--max-speakers", type=int)
    t.add_argument("--known-speaker", action="append", metavar="NAME=CLIP",
                   help="name the speaker whose voice matches CLIP (a 2-10 s file or http(s) URL of them speaking); "
                   "repeat for each person; implies --diarize unless --multichannel")  # fmt: skip
    t.add_argument("--multichannel", action="store_true",
                   help="transcribe each channel on its own, the channel as the speaker (CHANNEL_0, ...)")  # fmt: skip
    t.add_argument("--shards", type=int, default=1, metavar="N", help="cut long audio at pauses into N shards, "
                   "transcribe them as N processes here and merge them (default 1; short audio is not cut)")  # fmt: skip
    t.add_argument("--threads-per-shard", type=int, default=1, metavar="T", help="CPU threads per shard (default 1)")
    t.add_argument("--min-shard-seconds", type=float, metavar="S",
                   help="audio each shard gets at least (default IFW_SHARD_MIN_SECONDS, 300)")  # fmt: skip
    t.add_argument("--format", choices=[*FORMATS, "diarized_json"], default="json",
                   help="output format (default: json, the original API's shape; diarized_json: OpenAI's speaker "
                   "segments, with --diarize implied)")  # fmt: skip
    t.add_argument("--output", "-o", type=Path, help="write here instead of stdout")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: IFW_DEVICE or auto")
    t.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"],
                   help="default: IFW_DTYPE or auto (float16 on CUDA, float32 on CPU)")  # fmt: skip
    t.add_argument("--verbose", "-v", action="store_true", help="log what happens to stderr")

    sub.add_parser("job", help="run the TranscriptionJob named by IFW_JOB_NAMESPACE/IFW_JOB_NAME/IFW_JOB_UID")
    sub.add_parser("serve", help="run a warm pool worker (IFW_WORKER_NAME, ...): the operator assigns it jobs")
    return p


def _default_model(settings) -> str:
    from ifw.runner import models

    if os.environ.get("IFW_DEFAULT_MODEL"):
        return settings.default_model
    device = models.select_device(settings)
    if device.type == "cuda" or _in_hub_cache(settings.default_model):
        return settings.default_model
    print(
        f"ifw-runner: {settings.default_model} is not cached here; using the packaged {CPU_FALLBACK_MODEL!r} "
        "model (choose with --model)",
        file=sys.stderr,
    )
    return CPU_FALLBACK_MODEL


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return False


def transcribe(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ifw.core import formats
    from ifw.runner import errors, pipeline
    from ifw.runner.config import RunnerSettings

    overrides = {key: value for key, value in (("device", args.device), ("dtype", args.dtype)) if value}
    settings = RunnerSettings(**overrides)
    model = args.model or _default_model(settings)
    # The person at the keyboard picks any model; the allowed list guards the cluster.
    settings = settings.model_copy(
        update={
            "allowed_models": [*settings.allowed_models, model],
            "diarization_pipeline": settings.diarization_pipeline or "packaged",
        }
    )
    try:
        spec = TranscriptionJobSpec.model_validate(
            {
                # The CLI passes the audio itself; spec.audio.url is not read (and may be a local path here).
                "audio": AudioSource.model_construct(url=str(args.source)),
                "model": model,
                "task": args.task,
                "language": args.language or None,
                "batchSize": args.batch_size,
                "timestamp": args.timestamp,
                "prompt": args.prompt,
                "temperature": args.temperature,
                "hotwords": args.hotwords,
                "vad": {
                    "threshold": args.vad_threshold,
                    "prefixPaddingMs": args.vad_prefix_padding_ms,
                    "silenceDurationMs": args.vad_silence_duration_ms,
                },
                "multichannel": args.multichannel,
                "diarization": {
                    "enabled": args.diarize
                    or (not args.multichannel and (args.format == "diarized_json" or bool(args.known_speaker)))
                    or any(v is not None for v in (args.num_speakers, args.min_speakers, args.max_speakers)),
                    "numSpeakers": args.num_speakers,
                    "minSpeakers": args.min_speakers,
                    "maxSpeakers": args.max_speakers,
                },
            }
        )
    except ValidationError as e:
        for err in e.errors():
            print(f"error: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}", file=sys.stderr)
        return errors.EXIT_BAD_INPUT
    try:  # local files are references too here (the CRD takes only http(s) URLs)
        spec.diarization.known_speakers = _known_speakers(args.known_speaker or []) or None
    except ValueError as e:
        print(f"error: --known-speaker: {e}", file=sys.stderr)
        return errors.EXIT_BAD_INPUT

    from ifw.runner.progress import TerminalBar

    bar = TerminalBar(sys.stderr) if sys.stderr.isatty() else None  # quiet when stderr is a file or a pipe
    try:
        if args.shards != 1:
            transcript = _sharded(spec, args, settings)
        else:
            transcript = pipeline.run(spec, args.source, settings, on_progress=bar)
    except errors.RunnerError as e:
        if bar:
            bar.close()
        print(f"error: {e.reason}: {e.message}", file=sys.stderr)
        return e.exit_code
    if bar:
        bar.close()
    if args.format == "diarized_json":
        body = json.dumps(formats.to_diarized_json(transcript), ensure_ascii=False)
    else:
        body = formats.render(transcript, args.format)
    if not body.endswith("\n"):
        body += "\n"
    if args.output:
        args.output.write_text(body, encoding="utf-8")
    else:
        sys.stdout.write(body)
    return 0


def _sharded(spec, args: argparse.Namespace, settings):
    """--shards N: N child processes on this machine, one shard each, merged into one transcript."""
    from ifw.core import shards
    from ifw.runner import errors
    from ifw.runner.shard import run_local

    if args.shards < 1 or args.threads_per_shard < 1:
        raise errors.InvalidSpec(f"--shards and --threads-per-shard must be at least 1, got {args.shards} and "
                                 f"{args.threads_per_shard}")  # fmt: skip
    minimum = args.min_shard_seconds if args.min_shard_seconds is not None else settings.shard_min_seconds
    if minimum <= shards.CUT_WINDOW_SECONDS:
        raise errors.InvalidSpec(f"--min-shard-seconds must be more than {shards.CUT_WINDOW_SECONDS:g}, got {minimum:g}")
    partials = run_local(spec, args.source, args.shards, settings, threads=args.threads_per_shard,
                         min_shard_seconds=minimum)  # fmt: skip
    d = spec.diarization
    return shards.merge(partials, num_speakers=d.num_speakers, min_speakers=d.min_speakers,
                        max_speakers=d.max_speakers)  # fmt: skip


def _known_speakers(items: list[str]) -> list:
    from ifw.crds.transcriptionjob import (
        MAX_KNOWN_SPEAKERS,
        KnownSpeaker,
        check_known_speaker_names,
        check_speaker_name,
    )

    if len(items) > MAX_KNOWN_SPEAKERS:
        raise ValueError(f"at most {MAX_KNOWN_SPEAKERS} known speakers")
    known = []
    for item in items:
        name, sep, clip = item.partition("=")
        if not sep or not clip:
            raise ValueError(f"{item!r} must be NAME=CLIP (a file or http(s) URL)")
        known.append(KnownSpeaker.model_construct(name=check_speaker_name(name, "name"),
                                                  audio=AudioSource.model_construct(url=clip)))  # fmt: skip
    check_known_speaker_names([k.name for k in known], "names")
    return known


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "job":
        from ifw.runner import job

        return job.main()
    if args.command == "serve":
        from ifw.runner import worker

        return worker.main()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # transformers' own warnings and progress bars are noise on a command line
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    return transcribe(args)


if __name__ == "__main__":
    sys.exit(main())
