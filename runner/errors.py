"""Runner failures and how they leave the pod.

Every failure is an ``ifw.core.contract.Failure``: a CamelCase reason and an exit code. The
operator reads the termination message (one JSON line) and the exit code: ``EXIT_BAD_INPUT``
means bad input (the Job's podFailurePolicy fails the job at once, no retry),
``EXIT_TRANSIENT`` anything worth a retry (up to spec.backoffLimit). The result stores raise
their own Failures (``ifw.core.results``), which leave the pod the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

from ifw.core.contract import (
    ENV_TERMINATION_MESSAGE_PATH,
    EXIT_BAD_INPUT,
    EXIT_TRANSIENT,
    TERMINATION_MESSAGE_PATH,
    Failure,
    Reason,
)

__all__ = ["EXIT_BAD_INPUT", "EXIT_TRANSIENT", "RunnerError", "write_termination_message"]


class RunnerError(Failure):
    """A runner failure; its reason (ifw.core.contract.Reason) says whether a retry can help."""


class AudioFetchFailed(RunnerError):
    """The URL could not be fetched (unreachable, 4xx, refused by the SSRF guard)."""

    reason = Reason.AudioFetchFailed


class AudioFetchUnavailable(AudioFetchFailed):
    """The server answered 5xx or timed out: worth a retry."""

    retryable = True


class InvalidAudio(RunnerError):
    reason = Reason.InvalidAudio


class NotMultichannel(RunnerError):
    """spec.multichannel on audio with a single channel."""

    reason = Reason.NotMultichannel


class AudioTooLarge(RunnerError):
    reason = Reason.AudioTooLarge


class InvalidSpec(RunnerError):
    reason = Reason.InvalidSpec


class ModelLoadFailed(RunnerError):
    reason = Reason.ModelLoadFailed


class ModelHubUnavailable(ModelLoadFailed):
    """The model hub could not be reached and the weights are not cached: worth a retry."""

    retryable = True


class OutOfMemory(RunnerError):
    reason = Reason.OutOfMemory


class DeviceFailed(RunnerError):
    """A CUDA error that leaves the context unusable: every later call on this process fails too."""

    reason = Reason.DeviceFailed


def write_termination_message(error: Failure, path: Path | None = None) -> None:
    """Best effort: outside a pod the file may not be writable."""
    target = path or Path(os.environ.get(ENV_TERMINATION_MESSAGE_PATH, TERMINATION_MESSAGE_PATH))
    try:
        target.write_text(error.termination_message() + "\n")
    except OSError:
        pass
