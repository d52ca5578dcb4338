"""examples/ is applied as a user would (kubectl apply --server-side), and results are read back
with `ifw result` and `kubectl ifw result` — against the real test apiserver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import srt
import yaml

from ifw.core import results
from ifw.core.transcript import Segment, Transcript
from ifw.crds import transcriptionjob as tj

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BIN = Path(sys.executable).parent
MANIFESTS = sorted(p for p in EXAMPLES.rglob("*.yaml") if p.name != "values.yaml")


def run(kube, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": kube.kubeconfig, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    result = subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=60)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_every_example_is_applied_with_server_side_apply(kube, tj_crd, namespace):
    assert {p.name for p in MANIFESTS} >= {"plain.yaml", "diarized.yaml", "word-timestamps.yaml", "kueue.yaml",
                                           "suspended.yaml", "signed-webhook.yaml", "job.yaml"}  # fmt: skip
    for path in MANIFESTS:
        run(kube, "kubectl", "apply", "--server-side", "--field-manager=gitops", "-n", namespace, "-f", str(path))
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] != tj.KIND:
                continue
            got = json.loads(run(kube, "kubectl", "get", "tj", doc["metadata"]["name"], "-n", namespace,
                                 "-o", "json").stdout)  # fmt: skip
            # Exactly what the file says, plus the schema's defaults; and the Python types agree.
            for key, value in doc["spec"].items():
                assert got["spec"][key] == value, (path.name, key)
            tj.TranscriptionJob.model_validate(got)
    # Re-applying the same files changes nothing (what a GitOps tool does on every sync).
    before = json.loads(run(kube, "kubectl", "get", "tj", "-n", namespace, "-o", "json").stdout)["items"]
    for path in MANIFESTS:
        out = run(kube, "kubectl", "apply", "--server-side", "--field-manager=gitops", "-n", namespace,
                  "-f", str(path)).stdout  # fmt: skip
        assert "serverside-applied" in out
    after = json.loads(run(kube, "kubectl", "get", "tj", "-n", namespace, "-o", "json").stdout)["items"]
    assert [o["metadata"]["generation"] for o in after] == [o["metadata"]["generation"] for o in before]


def _finished(kube, namespace: str, name: str, transcript: Transcript) -> None:
    """What the operator and the runner leave behind: the result Secret and the status pointing at it."""
    from kubernetes import client

    with kube.api_client() as api:
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        job = custom.create_namespaced_custom_object(tj.GROUP, tj.VERSION, namespace, tj.PLURAL, {
            "apiVersion": tj.API_VERSION, "kind": tj.KIND, "metadata": {"name": name},
            "spec": {"audio": {"url": "https://media.example.com/a.mp3"}}})  # fmt: skip
        core.create_namespaced_secret(namespace, results.result_secret(job))
        ref = results.store_result(transcript, job, results.ResultSettings(), core_v1=core)
        custom.patch_namespaced_custom_object_status(tj.GROUP, tj.VERSION, namespace, tj.PLURAL, name,
                                                     {"status": {"phase": "Succeeded", "result": ref}})  # fmt: skip


def test_ifw_result_and_the_kubectl_plugin_print_the_transcript(kube, tj_crd, namespace):
    transcript = Transcript(
        text=" Good morning. Let us begin.",
        segments=[Segment(start=0.5, end=1.6, text=" Good morning."), Segment(start=2.0, end=3.2, text=" Let us begin.")],
        language="en", duration=3.5,
    )  # fmt: skip
    _finished(kube, namespace, "standup", transcript)

    cues = list(srt.parse(run(kube, "ifw", "result", "standup", "-n", namespace, "--format", "srt").stdout))
    assert [(c.content, c.start.total_seconds(), c.end.total_seconds()) for c in cues] == [
        ("Good morning.", 0.5, 1.6), ("Let us begin.", 2.0, 3.2)]
    # kubectl finds kubectl-ifw on PATH: the same command as a kubectl plugin.
    text = run(kube, "kubectl", "ifw", "result", "standup", "-n", namespace, "--format", "text").stdout
    assert text == "Good morning. Let us begin.\n"
    output = json.loads(run(kube, "ifw", "result", "standup", "-n", namespace).stdout)
    assert output["chunks"][0] == {"timestamp": [0.5, 1.6], "text": " Good morning."}


def test_ifw_result_says_why_there_is_none(kube, tj_crd, namespace):
    from kubernetes import client

    with kube.api_client() as api:
        custom = client.CustomObjectsApi(api)
        for name in ("running", "broken"):
            custom.create_namespaced_custom_object(tj.GROUP, tj.VERSION, namespace, tj.PLURAL, {
                "apiVersion": tj.API_VERSION, "kind": tj.KIND, "metadata": {"name": name},
                "spec": {"audio": {"url": "https://media.example.com/a.mp3"}}})  # fmt: skip
        custom.patch_namespaced_custom_object_status(tj.GROUP, tj.VERSION, namespace, tj.PLURAL, "running",
                                                     {"status": {"phase": "Running", "progress": {"percent": 40.0}}})
        custom.patch_namespaced_custom_object_status(tj.GROUP, tj.VERSION, namespace, tj.PLURAL, "broken", {
            "status": {"phase": "Failed", "reason": "InvalidAudio", "message": "cannot decode the audio"}})
    running = run(kube, "ifw", "result", "running", "-n", namespace, check=False)
    assert running.returncode == 1 and "is Running, 40% done" in running.stderr and not running.stdout
    broken = run(kube, "ifw", "result", "broken", "-n", namespace, check=False)
    assert broken.returncode == 2 and "InvalidAudio: cannot decode the audio" in broken.stderr
    missing = run(kube, "ifw", "result", "nothing-here", "-n", namespace, check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr
