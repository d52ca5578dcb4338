"""Prometheus metrics only the runner knows (served on a pool worker's health port at /metrics).

Audio transcribed and real-time factors are counted by the operator from each finished job's
status, for both runtimes: a runner Job's pod is short-lived and never scraped. What stays here
is what only the process that ran the model can see: the GPU memory it peaked at. The model's
load time and identity are ``ifw_runner_model_load_seconds`` and ``ifw_runner_model_info``
(runner/models.py).
"""

from __future__ import annotations

import logging
import sys

from prometheus_client import Gauge

log = logging.getLogger(__name__)

GPU_MEMORY_PEAK_BYTES = Gauge(
    "ifw_runner_gpu_memory_peak_bytes",
    "Peak GPU memory allocated by torch since the previous attempt ended (set after each attempt; "
    "with cross-job batching the attempts that overlapped share it). Absent on CPU.",
    ["device"],
)


def observe_attempt() -> None:
    """After an attempt's pipeline returned: the GPU memory peak, when CUDA is in use (never on CPU)."""
    torch = sys.modules.get("torch")  # never imported for this: a runner without torch has no GPU
    if torch is None:
        return
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        for index in range(torch.cuda.device_count()):
            GPU_MEMORY_PEAK_BYTES.labels(f"cuda:{index}").set(torch.cuda.max_memory_allocated(index))
            torch.cuda.reset_peak_memory_stats(index)
    except Exception as error:  # a metric must never fail a transcription
        log.debug("could not read the GPU memory peak: %s", error)
