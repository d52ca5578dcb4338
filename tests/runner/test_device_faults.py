"""What the runner learns from a GPU's failures, with the failures injected (CI has no GPU).

- An out-of-memory halves the generate() call, and the halved size holds for later calls (the
  pool's shared decoder makes one call per round: forgetting it ran out of memory every round);
  it grows back slowly.
- A CUDA error that breaks the context is DeviceFailed: a pool worker gives every job back, stops
  saying it is healthy and exits, so Kubernetes restarts it; the job that met the error counts a
  retry.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from ifw.core import contract
from ifw.runner import decoding, errors, models
from ifw.runner.config import RunnerSettings, WorkerSettings
from ifw.runner.worker import Worker
from tests.runner.conftest import read_wav
from tests.waiting import wait_for

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def whisper() -> models.WhisperModel:
    return models.load_model("tiny.en", RunnerSettings(default_model="tiny.en", device="cpu", cpu_threads=2))


@pytest.fixture
def limits(monkeypatch):
    fresh = decoding.BatchLimits()
    monkeypatch.setattr(decoding, "BATCH_LIMITS", fresh)
    return fresh


def _fits_at_most(monkeypatch, most: int) -> list[int]:
    """generate() calls of more than ``most`` pieces run out of memory; returns every call's size."""
    real = decoding._decode_chunk
    calls: list[int] = []

    def chunk(whisper, states, options):
        calls.append(len(states))
        if len(states) > most:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(whisper, states, options)

    monkeypatch.setattr(decoding, "_decode_chunk", chunk)
    return calls


def test_the_batch_that_fit_is_remembered_and_grows_back_slowly(whisper, harvard, limits, monkeypatch):
    clips = [read_wav(s.path) for s in harvard[:4]]
    requests = [decoding.PieceRequest(clip) for clip in clips]
    calls = _fits_at_most(monkeypatch, 2)
    first = decoding.decode_pieces(whisper, requests, batch_size=8)
    assert calls == [4, 2, 2]  # ran out at 4, halved
    assert all(r.text.strip() for r in first)

    calls.clear()
    stats = decoding.DecodeStats()
    again = decoding.decode_pieces(whisper, requests, batch_size=8, stats=stats)
    assert calls == [2, 2] and stats.oom_halvings == 0  # no second out-of-memory
    assert [r.text for r in again] == [r.text for r in first]
    assert limits.rows(whisper, 8) == 2 and limits.rows(whisper, 1) == 1

    monkeypatch.setattr(decoding.BatchLimits, "GROW_AFTER", 2)
    calls.clear()
    decoding.decode_pieces(whisper, requests[:2], batch_size=8)
    decoding.decode_pieces(whisper, requests[:2], batch_size=8)
    assert limits.rows(whisper, 8) == 3  # two calls fit at 2: a quarter more (at least one)


def test_a_single_piece_that_does_not_fit_is_out_of_memory(whisper, harvard, limits, monkeypatch):
    _fits_at_most(monkeypatch, 0)
    with pytest.raises(errors.OutOfMemory) as info:
        decoding.decode_pieces(whisper, [decoding.PieceRequest(read_wav(harvard[0].path))], batch_size=4)
    assert info.value.exit_code == contract.EXIT_TRANSIENT


def _broken_context(monkeypatch) -> None:
    def chunk(whisper, states, options):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                           "asynchronously reported at some other API call")

    monkeypatch.setattr(decoding, "_decode_chunk", chunk)


def test_a_cuda_error_that_breaks_the_context_is_device_failed(whisper, harvard, limits, monkeypatch):
    _broken_context(monkeypatch)
    with pytest.raises(errors.DeviceFailed) as info:
        decoding.decode_pieces(whisper, [decoding.PieceRequest(read_wav(harvard[0].path))], batch_size=4)
    assert info.value.reason == "DeviceFailed" and info.value.exit_code == contract.EXIT_TRANSIENT
    assert not decoding.device_failed(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not decoding.device_failed(RuntimeError("shapes do not match"))


@pytest.mark.cluster
def test_a_worker_whose_device_fails_gives_its_jobs_back_and_exits(kube, tj_crd, namespace, tmp_path, harvard,
                                                                  monkeypatch):  # fmt: skip
    import functools
    import http.server
    import threading

    from tests.runner.test_worker import Cluster

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(harvard[0].path.parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    with kube.api_client() as api:
        cluster = Cluster(api, namespace)
        settings = WorkerSettings(name=f"gpu-{uuid.uuid4().hex[:6]}", namespace=namespace, watch_namespaces=[namespace],
                                  renew_interval_seconds=0.5, lease_duration_seconds=3, health_port=None)  # fmt: skip
        runner = RunnerSettings(default_model="tiny.en", device="cpu", cpu_threads=2, work_dir=tmp_path / "work",
                                fetch_allowlist=["127.0.0.1"])  # fmt: skip
        worker = Worker(settings, runner, api).start()
        try:
            _broken_context(monkeypatch)
            tj = cluster.create(f"{base}/{harvard[0].path.name}")
            cluster.assign(tj, settings.name)
            failed = wait_for(lambda: cluster.execution(tj, "Failed"), 60, "the attempt reported")
            assert failed["reason"] == "DeviceFailed" and not failed.get("badInput")  # retried, counted
            assert worker.exit_requested.wait(10) and not worker.healthy()  # main() exits; liveness fails
            # Jobs assigned from now on are not taken: it is draining until it exits.
            later = cluster.create(f"{base}/{harvard[1].path.name}")
            cluster.assign(later, settings.name)
            back = wait_for(lambda: cluster.execution(later, "HandedBack"), 30, "the hand-back")
            assert back["reason"] == "WorkerDraining"
        finally:
            worker.stop()
            server.shutdown()
