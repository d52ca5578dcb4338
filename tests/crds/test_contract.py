"""The TranscriptionJob contract, enforced by a real kube-apiserver.

Every invalid manifest is sent to the server AND to the Python types: both must
refuse it, naming the same field, so what the gateway checks in-process and
what `kubectl apply` gets from the server cannot disagree.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from ifw.crds import transcriptionjob as tj

pytestmark = pytest.mark.cluster

URL = "https://media.example.com/meeting.mp3"


def manifest(name: str, **spec) -> dict:
    return {
        "apiVersion": tj.API_VERSION,
        "kind": tj.KIND,
        "metadata": {"name": name},
        "spec": {"audio": {"url": URL}, **spec},
    }


def create(api: client.CustomObjectsApi, namespace: str, body: dict, **kwargs) -> dict:
    return api.create_namespaced_custom_object(tj.GROUP, tj.VERSION, namespace, tj.PLURAL, body, **kwargs)


def server_error(call, status: int = 422) -> str:
    with pytest.raises(ApiException) as caught:
        call()
    assert caught.value.status == status, caught.value.body
    return caught.value.body


@pytest.fixture
def api(kube, tj_crd) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube.api_client())


# (what is wrong, spec overrides, field the server names, field pydantic names)
INVALID = [
    ("ftp scheme", {"audio": {"url": "ftp://media.example.com/a.mp3"}}, "spec.audio.url", "audio.url"),
    ("no host", {"audio": {"url": "http://"}}, "spec.audio.url", "audio.url"),
    ("script url", {"audio": {"url": "javascript:alert(1)"}}, "spec.audio.url", "audio.url"),
    ("credentials in url", {"audio": {"url": "https://user:secret@media.example.com/a.mp3"}}, "spec.audio.url",
     "audio.url"),
    ("token in webhook url", {"webhook": {"url": "https://token@hooks.example.com/x"}}, "spec.webhook.url",
     "webhook.url"),
    ("url missing", {"audio": {}}, "spec.audio.url", "audio.url"),
    ("unknown task", {"task": "summarize"}, "spec.task", "task"),
    ("batchSize 0", {"batchSize": 0}, "spec.batchSize", "batchSize"),
    ("batchSize 257", {"batchSize": 257}, "spec.batchSize", "batchSize"),
    ("batchSize not a number", {"batchSize": "ten"}, "spec.batchSize", "batchSize"),
    ("bad timestamp", {"timestamp": "segment"}, "spec.timestamp", "timestamp"),
    ("unknown language", {"language": "klingon"}, "spec.language", "language"),
    ("min > max speakers", {"diarization": {"enabled": True, "minSpeakers": 3, "maxSpeakers": 2}},
     "spec.diarization.minSpeakers", "diarization"),
    ("num with min", {"diarization": {"enabled": True, "numSpeakers": 2, "minSpeakers": 1}},
     "spec.diarization.numSpeakers", "diarization"),
    ("num with max", {"diarization": {"numSpeakers": 2, "maxSpeakers": 4}},
     "spec.diarization.numSpeakers", "diarization"),
    ("zero speakers", {"diarization": {"numSpeakers": 0}}, "spec.diarization.numSpeakers",
     "diarization.numSpeakers"),
    ("webhook bad scheme", {"webhook": {"url": "file:///etc/passwd"}}, "spec.webhook.url", "webhook.url"),
    ("webhook without url", {"webhook": {}}, "spec.webhook.url", "webhook.url"),
    ("bad secret name", {"webhook": {"url": URL, "headersSecretRef": {"name": "Bad_Name"}}},
     "spec.webhook.headersSecretRef.name", "webhook.headersSecretRef.name"),
    ("deadline 0", {"activeDeadlineSeconds": 0}, "spec.activeDeadlineSeconds", "activeDeadlineSeconds"),
    ("negative backoff", {"backoffLimit": -1}, "spec.backoffLimit", "backoffLimit"),
    ("negative ttl", {"ttlSecondsAfterFinished": -5}, "spec.ttlSecondsAfterFinished", "ttlSecondsAfterFinished"),
    ("bad queue name", {"queueName": "Not A Queue"}, "spec.queueName", "queueName"),
    ("path-like model", {"model": "../../etc/passwd"}, "spec.model", "model"),
    ("parallelism 0", {"parallelism": 0}, "spec.parallelism", "parallelism"),
    ("parallelism 65", {"parallelism": 65}, "spec.parallelism", "parallelism"),
    ("parallelism not Auto", {"parallelism": "auto"}, "spec.parallelism", "parallelism"),
    ("shards of channels", {"parallelism": 2, "multichannel": True}, "spec.parallelism", "parallelism"),
    ("shards with known speakers", {"parallelism": 3, "diarization": {"enabled": True, "knownSpeakers": [
        {"name": "Alice", "audio": {"url": URL}}]}}, "spec.parallelism", "parallelism"),
]


@pytest.mark.parametrize(("what", "overrides", "server_field", "python_field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_refused_by_server_and_types(api, namespace, what, overrides, server_field, python_field):
    body = manifest("bad", **overrides)
    message = server_error(lambda: create(api, namespace, body))
    assert server_field in message, f"{what}: the server's message does not name {server_field}: {message}"

    with pytest.raises(ValidationError) as caught:
        tj.TranscriptionJobSpec.model_validate(body["spec"])
    locations = {".".join(str(part) for part in error["loc"]) for error in caught.value.errors()}
    assert any(loc.startswith(python_field) for loc in locations), f"{what}: pydantic named {locations}"


def test_enough_invalid_manifests_are_covered():
    assert len(INVALID) >= 15


def test_missing_spec_and_unknown_fields_are_refused(api, namespace):
    no_spec = {"apiVersion": tj.API_VERSION, "kind": tj.KIND, "metadata": {"name": "nospec"}}
    assert "spec: Required value" in server_error(lambda: create(api, namespace, no_spec))

    typo = manifest("typo", batchSise=8)
    message = server_error(lambda: create(api, namespace, typo, field_validation="Strict"), status=400)
    assert json.loads(message)["message"].endswith('unknown field "spec.batchSise"')


def test_crd_is_established_and_served(kube, tj_crd):
    crd = client.ApiextensionsV1Api(kube.api_client()).read_custom_resource_definition(f"{tj.PLURAL}.{tj.GROUP}")
    conditions = {c.type: c.status for c in crd.status.conditions}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    resources = client.CustomObjectsApi(kube.api_client()).get_api_resources(tj.GROUP, tj.VERSION).resources
    names = {r.name: r for r in resources}
    assert names[tj.PLURAL].short_names == ["tj"] and names[tj.PLURAL].namespaced
    assert f"{tj.PLURAL}/status" in names


def test_defaults_are_applied_on_create(api, namespace):
    created = create(api, namespace, manifest("defaults"))
    assert created["spec"] == {
        "audio": {"url": URL},
        "task": "transcribe",
        "batchSize": 64,
        "timestamp": "chunk",
        "diarization": {"enabled": False},
        "multichannel": False,
        "suspend": False,
        "backoffLimit": 2,
    }
    # What the server stored parses back into the Python types unchanged.
    parsed = tj.TranscriptionJob.model_validate(created)
    assert parsed.spec.model_dump(by_alias=True, exclude_none=True) == created["spec"]


def test_valid_full_manifest_is_accepted(api, namespace):
    body = manifest(
        "full",
        task="translate",
        language="de",
        model="openai/whisper-large-v3",
        batchSize=256,
        timestamp="word",
        diarization={"enabled": True, "minSpeakers": 2, "maxSpeakers": 2},
        webhook={"url": "https://hooks.example.com/done", "headersSecretRef": {"name": "hook-headers"}},
        activeDeadlineSeconds=3600,
        backoffLimit=0,
        ttlSecondsAfterFinished=0,
        queueName="gpu-queue",
        parallelism=64,
    )
    created = create(api, namespace, body)
    assert tj.TranscriptionJobSpec.model_validate(created["spec"]).diarization.max_speakers == 2
    auto = create(api, namespace, manifest("auto", parallelism="Auto"))
    assert tj.TranscriptionJobSpec.model_validate(auto["spec"]).parallelism == "Auto"


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("spec.audio", lambda s: s["audio"].update(url=URL + "?v=2")),
        ("spec.task", lambda s: s.update(task="translate")),
        ("spec.batchSize", lambda s: s.update(batchSize=8)),
        ("spec.model", lambda s: s.update(model="openai/whisper-tiny")),
        ("spec.diarization", lambda s: s["diarization"].update(enabled=True)),
        ("spec.webhook", lambda s: s.update(webhook={"url": URL})),
        ("spec.queueName", lambda s: s.update(queueName="other")),
        ("spec.parallelism", lambda s: s.update(parallelism=4)),
    ],
)
def test_spec_is_immutable(api, namespace, field, change):
    created = create(api, namespace, manifest("frozen"))
    edited = copy.deepcopy(created)
    change(edited["spec"])
    message = server_error(
        lambda: api.replace_namespaced_custom_object(tj.GROUP, tj.VERSION, namespace, tj.PLURAL, "frozen", edited)
    )
    assert f"{field}: Invalid value" in message and f"{field} is immutable" in message


def test_suspend_and_ttl_stay_mutable(api, namespace):
    create(api, namespace, manifest("mutable", suspend=True))
    patched = api.patch_namespaced_custom_object(
        tj.GROUP, tj.VERSION, namespace, tj.PLURAL, "mutable", {"spec": {"suspend": False, "ttlSecondsAfterFinished": 60}}
    )
    assert patched["spec"]["suspend"] is False and patched["spec"]["ttlSecondsAfterFinished"] == 60
    assert patched["metadata"]["generation"] == 2


def test_status_and_spec_are_written_through_separate_endpoints(api, namespace):
    body = manifest("split")
    body["status"] = {"phase": "Succeeded"}
    created = create(api, namespace, body)
    assert "status" not in created or "phase" not in created.get("status", {}), "create must not set status"

    # A write to the main resource cannot change status ...
    updated = api.patch_namespaced_custom_object(
        tj.GROUP, tj.VERSION, namespace, tj.PLURAL, "split", {"status": {"phase": "Failed"}}
    )
    assert updated.get("status", {}).get("phase") is None

    # ... and /status cannot change the spec, nor bump the generation.
    after_status = api.patch_namespaced_custom_object_status(
        tj.GROUP, tj.VERSION, namespace, tj.PLURAL, "split",
        {"spec": {"suspend": True}, "status": {"phase": "Running", "progress": {"percent": 42.5}}},
    )
    assert after_status["spec"]["suspend"] is False
    assert after_status["status"]["phase"] == "Running" and after_status["status"]["progress"]["percent"] == 42.5
    assert after_status["metadata"]["generation"] == created["metadata"]["generation"]


def test_status_is_validated_too(api, namespace):
    create(api, namespace, manifest("badstatus"))
    message = server_error(
        lambda: api.patch_namespaced_custom_object_status(
            tj.GROUP, tj.VERSION, namespace, tj.PLURAL, "badstatus", {"status": {"phase": "Exploded"}}
        )
    )
    assert "status.phase" in message


KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")


def kubectl(kube, *args: str) -> str:
    result = subprocess.run(
        [KUBECTL, "--kubeconfig", str(kube.kubeconfig), *args],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_kubectl_get_prints_the_columns(kube, api, namespace):
    create(api, namespace, manifest("columns"))
    api.patch_namespaced_custom_object_status(
        tj.GROUP, tj.VERSION, namespace, tj.PLURAL, "columns",
        {"status": {"phase": "Running", "progress": {"percent": 37.5}, "audio": {"language": "en", "durationSeconds": 92.4},
                    "reason": "PodRunning", "model": "openai/whisper-large-v3", "jobName": "columns-runner",
                    "shards": {"count": 3, "items": {"0": {"state": "Running", "processedSeconds": 4.5}}}}},
    )
    table = kubectl(kube, "get", "tj", "-n", namespace)
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "SHARDS", "LANGUAGE", "DURATION", "AGE"]
    assert row.split()[:6] == ["columns", "Running", "37.5", "3", "en", "92.4"]

    wide = kubectl(kube, "get", "transcriptionjobs.ifw.dev", "-n", namespace, "-o", "wide").splitlines()
    assert wide[0].split()[-5:] == ["REASON", "MODEL", "RUNTIME", "WORKER", "JOB"]
    assert wide[1].split()[-3:] == ["PodRunning", "openai/whisper-large-v3", "columns-runner"]

    # The ifw category lists it too.
    assert "columns" in kubectl(kube, "get", "ifw", "-n", namespace)


def test_kubectl_explain_documents_the_fields(kube, tj_crd):
    text = kubectl(kube, "explain", "tj.spec.diarization")
    assert "Speaker diarization settings" in text
    for field in ("enabled", "numSpeakers", "minSpeakers", "maxSpeakers"):
        assert field in text
    assert "Exact number of speakers" in kubectl(kube, "explain", "tj.spec.diarization.numSpeakers")


def test_kubectl_apply_reports_the_field(kube, tj_crd, namespace, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        f"apiVersion: {tj.API_VERSION}\nkind: {tj.KIND}\nmetadata:\n  name: applied\n  namespace: {namespace}\n"
        f"spec:\n  audio:\n    url: {URL}\n  batchSize: 0\n"
    )
    result = subprocess.run(
        [KUBECTL, "--kubeconfig", str(kube.kubeconfig), "apply", "-f", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "spec.batchSize" in result.stderr and "should be greater than or equal to 1" in result.stderr
