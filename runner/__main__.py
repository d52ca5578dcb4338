"""The runner's command line (console script `ifw-runner`).

    ifw-runner transcribe <file-or-url> [--model M] [--language L] [--task transcribe|translate]
                          [--batch-size N] [--timestamp chunk|word] [--prompt TEXT] [--temperature T]
                          [--diarize]
                          [--num-speakers N | --min-speakers N --max-speakers N]
                          [--format json|text|srt|vtt|verbose_json] [--output FILE]
                          [--device auto|cpu|cuda] [--dtype auto|float32|float16|bfloat16]
    ifw-runner job        # inside the runner Pod: run the TranscriptionJob named by IFW_JOB_*
    ifw-runner serve      # a warm pool worker: hold the models, take assigned jobs (IFW_WORKER_*)

`transcribe` runs the same pipeline as the Pod (ifw.runner.pipeline.run) and
prints the result to stdout unless --output is given.

Default model: --model, else IFW_DEFAULT_MODEL when set, else (on CUDA, or
when the hub cache holds it) the configured default (openai/whisper-large-v3),
else the packaged multilingual "base": it needs no download, detects the
language and can translate (the packaged "tiny.en" is ~2x faster, English only).
"""

from __future__ import annotations

import argparse
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
    t.add_argument("--diarize", action="store_true", help="split by speaker (pyannote)")
    t.add_argument("--num-speakers", type=int)
    t.add_argument("--min-speakers", type=int)
    t.add_argument("--max-speakers", type=int)
    t.add_argument("--format", choices=FORMATS, default="json", help="output format (default: json, the original API's shape)")
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
                "diarization": {
                    "enabled": args.diarize or any(
                        v is not None for v in (args.num_speakers, args.min_speakers, args.max_speakers)
                    ),
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

    def show_progress(processed: float, total: float) -> None:
        if sys.stderr.isatty() and total > 0:
            print(f"\r{100 * processed / total:5.1f}% of {total:.0f} s", end="", file=sys.stderr, flush=True)

    try:
        transcript = pipeline.run(spec, args.source, settings, on_progress=show_progress)
    except errors.RunnerError as e:
        print(f"error: {e.reason}: {e.message}", file=sys.stderr)
        return e.exit_code
    if sys.stderr.isatty():
        print(file=sys.stderr)
    body = formats.render(transcript, args.format)
    if not body.endswith("\n"):
        body += "\n"
    if args.output:
        args.output.write_text(body, encoding="utf-8")
    else:
        sys.stdout.write(body)
    return 0


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
