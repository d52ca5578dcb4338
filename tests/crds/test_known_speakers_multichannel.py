"""spec.diarization.knownSpeakers and spec.multichannel, enforced by the real kube-apiserver and by the
Python types alike, and what `kubectl apply` makes of them (bounds defined once, crds/transcriptionjob.py).
"""

from __future__ import annotations

import subprocess

import pytest
from pydantic import ValidationError

from ifw.crds import transcriptionjob as tj
from tests.crds.test_contract import KUBECTL, api, create, kubectl, manifest, server_error  # noqa: F401 - api: fixture

pytestmark = pytest.mark.cluster

REF = {"audio": {"url": "https://media.example.com/alice.wav"}}


def known(*names: str, enabled: bool = True) -> dict:
    return {"diarization": {"enabled": enabled, "knownSpeakers": [{"name": n, **REF} for n in names]}}


# (what is wrong, spec overrides, field the server names, field pydantic names)
INVALID = [
    ("too many known speakers", known(*[f"p{i}" for i in range(tj.MAX_KNOWN_SPEAKERS + 1)]),
     "spec.diarization.knownSpeakers", "diarization.knownSpeakers"),
    ("duplicate names", known("Alice", "Alice"), "spec.diarization.knownSpeakers", "diarization"),
    ("reserved name", known("SPEAKER_01"), "spec.diarization.knownSpeakers[0].name", "diarization.knownSpeakers.0.name"),
    ("channel name", known("CHANNEL_0"), "spec.diarization.knownSpeakers[0].name", "diarization.knownSpeakers.0.name"),
    ("padded name", known(" Alice"), "spec.diarization.knownSpeakers[0].name", "diarization.knownSpeakers.0.name"),
    ("long name", known("x" * (tj.MAX_SPEAKER_NAME_LENGTH + 1)), "spec.diarization.knownSpeakers[0].name",
     "diarization.knownSpeakers.0.name"),
    ("reference not http", {"diarization": {"enabled": True, "knownSpeakers": [
        {"name": "a", "audio": {"url": "file:///etc/passwd"}}]}}, "spec.diarization.knownSpeakers[0].audio.url",
     "diarization.knownSpeakers.0.audio.url"),
    ("known speakers without diarization", known("Alice", enabled=False), "diarization.knownSpeakers needs", ""),
    ("multichannel with diarization", {"multichannel": True, "diarization": {"enabled": True}}, "spec.multichannel",
     ""),
    ("multichannel not a bool", {"multichannel": "maybe"}, "spec.multichannel", "multichannel"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "overrides", "server_field", "python_field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_is_refused_by_server_and_types(api, namespace, what, overrides, server_field, python_field):  # noqa: F811
    body = manifest("bad", **overrides)
    message = server_error(lambda: create(api, namespace, body))
    assert server_field in message, f"{what}: the server's message does not name {server_field}: {message}"
    with pytest.raises(ValidationError) as caught:
        tj.TranscriptionJobSpec.model_validate(body["spec"])
    locations = {".".join(str(part) for part in error["loc"]) for error in caught.value.errors()}
    assert any(loc.startswith(python_field) for loc in locations), f"{what}: pydantic named {locations}"


def test_valid_ones_are_accepted_and_parse_back(api, namespace):  # noqa: F811
    names = [f"Person {i}" for i in range(tj.MAX_KNOWN_SPEAKERS - 1)] + ["José O'Brien-Ñ"]
    created = create(api, namespace, manifest("named", **known(*names)))
    spec = tj.TranscriptionJobSpec.model_validate(created["spec"])
    assert [k.name for k in spec.diarization.known_speakers] == names and spec.multichannel is False
    channels = create(api, namespace, manifest("channels", multichannel=True, **known("agent", enabled=False)))
    spec = tj.TranscriptionJobSpec.model_validate(channels["spec"])
    assert spec.multichannel and spec.diarization.known_speakers[0].name == "agent"


def test_kubectl_apply_takes_them_and_reports_a_bad_one(kube, tj_crd, namespace, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        f"apiVersion: {tj.API_VERSION}\nkind: {tj.KIND}\nmetadata:\n  name: call\n  namespace: {namespace}\n"
        "spec:\n  audio:\n    url: https://media.example.com/call.wav\n  multichannel: true\n"
        "  diarization:\n    knownSpeakers:\n    - name: agent\n      audio:\n        url: https://media.example.com/agent.wav\n"
    )
    assert "created" in kubectl(kube, "apply", "-f", str(good))
    got = kubectl(kube, "get", "tj", "call", "-n", namespace, "-o",
                  "jsonpath={.spec.multichannel} {.spec.diarization.knownSpeakers[0].name}")  # fmt: skip
    assert got == "true agent"
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("name: call", "name: call2").replace("multichannel: true\n",
                   "multichannel: true\n  diarization:\n    enabled: true\n").replace("  diarization:\n    knownSpeakers",
                   "    knownSpeakers"))  # fmt: skip
    result = subprocess.run([KUBECTL, "--kubeconfig", str(kube.kubeconfig), "apply", "-f", str(bad)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode != 0 and "spec.multichannel" in result.stderr, result.stderr
    assert "multichannel" in kubectl(kube, "explain", "tj.spec.multichannel")
    assert "known_speaker_names" in kubectl(kube, "explain", "tj.spec.diarization.knownSpeakers")
