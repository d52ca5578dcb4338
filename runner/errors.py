"""Runner failures and how they leave the pod.

The operator reads the termination message (one JSON line) and the exit code:
2 means bad input (the Job's podFailurePolicy fails the job at once, no retry),
1 means transient (retried up to spec.backoffLimit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

EXIT_TRANSIENT = 1
EXIT_BAD_INPUT = 2
# The pod's terminationMessagePath; overridable where the runner is not in a pod (the local stack).
TERMINATION_LOG = Path(os.environ.get("IFW_TERMINATION_MESSAGE_PATH", "/dev/termination-log"))


class RunnerError(Exception):
    """A failure with a CamelCase reason a person can act on."""

    reason = "RunnerFailed"
    exit_code = EXIT_TRANSIENT

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def termination_message(self) -> str:
        return json.dumps({"reason": self.reason, "message": self.message[:3500]})


class BadInput(RunnerError):
    exit_code = EXIT_BAD_INPUT


class AudioFetchFailed(BadInput):
    """The URL could not be fetched (unreachable, 4xx, refused by the SSRF guard)."""

    reason = "AudioFetchFailed"


class AudioFetchUnavailable(RunnerError):
    """The server answered 5xx or timed out: worth a retry."""

    reason = "AudioFetchFailed"


class InvalidAudio(BadInput):
    reason = "InvalidAudio"


class AudioTooLarge(BadInput):
    reason = "AudioTooLarge"


class InvalidSpec(BadInput):
    reason = "InvalidSpec"


class ModelLoadFailed(BadInput):
    reason = "ModelLoadFailed"


class ModelHubUnavailable(RunnerError):
    """The model hub could not be reached and the weights are not cached: worth a retry."""

    reason = "ModelLoadFailed"


class ResultTooLarge(BadInput):
    reason = "ResultTooLarge"


class OutOfMemory(RunnerError):
    reason = "OutOfMemory"


class ResultStoreFailed(RunnerError):
    reason = "ResultStoreFailed"


def write_termination_message(error: RunnerError, path: Path = TERMINATION_LOG) -> None:
    """Best effort: outside a pod the file may not be writable."""
    try:
        path.write_text(error.termination_message() + "\n")
    except OSError:
        pass
