"""A sharded TranscriptionJob end to end through the local stack: the real operator, the kubelet
stand-in running the Indexed Job's shards as processes, the real runner on real speech (tiny.en).

The same file runs whole and as 3 shards; one shard's runner is SIGKILLed mid-run and is retried
alone; the merged transcript says what the whole run says."""

from __future__ import annotations

import io
import re
import shutil
import signal
import subprocess
import sys
import wave
from pathlib import Path

import jiwer
import numpy as np
import pytest
from kubernetes import client

from ifw.core import results
from ifw.crds.transcriptionjob import API_VERSION, GROUP, KIND, PLURAL, VERSION
from ifw.local.control_plane import ControlPlane
from ifw.local.stack import LocalStack, control_plane_client
from tests.cluster.origin import Origin
from tests.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.model]

HARVARD = Path(__file__).resolve().parents[3] / "shared" / "speech" / "harvard"
KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
RATE = 16000


def _speech(repeats: int = 4) -> bytes:
    """The Harvard sentences (two real speakers) with a second of silence between them, repeated: ~140 s."""
    pause = np.zeros(RATE, dtype=np.int16)
    parts = []
    for path in sorted(HARVARD.glob("*.wav")):
        with wave.open(str(path)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2), path
            parts += [np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16), pause]
    samples = np.concatenate(parts * repeats)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(samples.tobytes())
    return out.getvalue()


class _ShardingStack(LocalStack):
    """Shards of at least 40 s (the default 5 min would leave this file whole)."""

    def operator_config(self, runner_env, **ports):
        config = super().operator_config(runner_env, **ports)
        config["sharding"] = {"auto_above_seconds": 60, "min_shard_seconds": 40, "max_shards": 3}
        return config


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z' ]", " ", text.lower()).split())


def test_three_shards_on_real_speech_match_the_whole_run_and_a_killed_shard_is_retried_alone(tmp_path):
    with Origin(audio=_speech()) as origin, ControlPlane() as cp:
        work = tmp_path / "stack"
        work.mkdir()
        stack = _ShardingStack(work, "tiny.en", pool_workers=0, media_allowlist=["127.0.0.1"])
        stack.start(cp)
        try:
            api = control_plane_client(cp.kubeconfig)
            custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
            ns = stack.namespace

            def create(name: str, **spec) -> dict:
                body = {
                    "apiVersion": API_VERSION,
                    "kind": KIND,
                    "metadata": {"name": name},
                    "spec": {"audio": {"url": f"{origin.base}/speech.wav"}, "model": "tiny.en", **spec},
                }
                return custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

            def status(name: str) -> dict:
                return custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}

            def done(name: str, timeout: float) -> dict:
                return wait_for(lambda: (lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None)(
                    status(name)), timeout, what=f"{name} to finish", interval=1)  # fmt: skip

            whole = create("whole")
            finished = done("whole", 300)
            assert finished["phase"] == "Succeeded", finished
            assert not finished.get("shards")
            reference = results.load_result(finished["result"], ns, job_uid=whole["metadata"]["uid"], core_v1=core)

            sharded = create("sharded", parallelism=3)
            uid = sharded["metadata"]["uid"]
            # Kill shard 1's runner once it is transcribing: the Indexed Job retries that index alone.
            wait_for(lambda: "1" in ((status("sharded").get("shards") or {}).get("items") or {}), 300,
                     what="shard 1 reporting progress", interval=0.5)  # fmt: skip
            run = next(r for r in stack.node.runs.values() if r.uid and r.name.endswith("-sh"))
            victim = run.slots[1].process
            victim.send_signal(signal.SIGKILL)
            finished = done("sharded", 600)
            assert finished["phase"] == "Succeeded", finished
            merged = results.load_result(finished["result"], ns, job_uid=uid, core_v1=core)

            # Three shards ran; index 1 twice (the killed try and its retry), the others once.
            assert finished["shards"]["count"] == 3 and finished["shards"]["succeeded"] == 3
            pods = core.list_namespaced_pod(ns, label_selector=f"ifw.dev/job-uid={uid}").items
            per_index = sorted(p.metadata.labels["batch.kubernetes.io/job-completion-index"] for p in pods)
            assert per_index == ["0", "1", "1", "2"], per_index
            assert [r.index for r in merged.processed_by.runners] == [0, 1, 2]
            assert len({r.pod for r in merged.processed_by.runners}) == 3

            # The same words as the whole run, in time order, on the file's clock.
            error = jiwer.wer(_words(reference.text), _words(merged.text))
            assert error <= 0.03, (error, reference.text, merged.text)
            starts = [s.start for s in merged.segments]
            assert starts == sorted(starts) and merged.segments[-1].end > 100
            assert abs(merged.duration - reference.duration) < 0.5
            assert finished["audio"]["speechSeconds"] == pytest.approx(reference.speech_seconds, abs=3.0)
            assert finished["progress"]["percent"] == 100.0
            # Partials are gone once merged; the one result stays.
            secrets = [s.metadata.name for s in core.list_namespaced_secret(
                ns, label_selector=f"ifw.dev/job-uid={uid}").items]  # fmt: skip
            assert secrets == ["sharded-result"], secrets

            table = subprocess.run([KUBECTL, "--kubeconfig", cp.kubeconfig, "get", "tj", "-n", ns],
                                   capture_output=True, text=True, check=True).stdout  # fmt: skip
            header, *rows = table.splitlines()
            assert "SHARDS" in header.split()
            row = next(r.split() for r in rows if r.startswith("sharded "))
            assert row[header.split().index("SHARDS")] == "3", table
        finally:
            stack.stop()
