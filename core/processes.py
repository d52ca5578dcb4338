"""Child processes that end with the process that started them (stdlib only: bench/gpu_bench.py loads
this file by path on a GPU machine that may lack ifw's other dependencies)."""

from __future__ import annotations

import signal
import sys


def _load_prctl():
    """libc's prctl, looked up once here: a preexec_fn runs between fork and exec, where loading a
    library (dlopen) in a process with threads may deadlock."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except Exception:
        return None


_PRCTL = _load_prctl()


def die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the process that started it dies
    (pytest killed by a timeout, a crashed CLI, a SIGKILLed `ifw local`): no stray children.

    Linux sends it when the *thread* that forked the child ends, so call it only from a thread
    that lives as long as the children should (the main thread; ifw local's supervisor)."""
    if _PRCTL is None:
        return
    try:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
