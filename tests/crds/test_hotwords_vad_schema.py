"""spec.hotwords and spec.vad, enforced by the real kube-apiserver and by the Python types alike,
and what `kubectl apply` / `kubectl explain` make of them. The bounds are defined once
(crds/transcriptionjob.py) and used by the CRD, the gateway and the CLI.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ifw.crds import transcriptionjob as tj
from tests.crds.test_contract import api, create, kubectl, manifest, server_error  # noqa: F401 - api is a fixture

pytestmark = pytest.mark.cluster

# (what is wrong, spec overrides, field the server names, field pydantic names)
INVALID = [
    ("too many hotwords", {"hotwords": ["w"] * (tj.MAX_HOTWORDS + 1)}, "spec.hotwords", "hotwords"),
    ("hotword too long", {"hotwords": ["x" * (tj.MAX_HOTWORD_LENGTH + 1)]}, "spec.hotwords[0]", "hotwords.0"),
    ("empty hotword", {"hotwords": [""]}, "spec.hotwords[0]", "hotwords.0"),
    ("special token hotword", {"hotwords": ["ok", "say <|en|>"]}, "spec.hotwords", "hotwords"),
    ("hotwords not a list", {"hotwords": "kopf"}, "spec.hotwords", "hotwords"),
    ("vad threshold 1.5", {"vad": {"threshold": 1.5}}, "spec.vad.threshold", "vad.threshold"),
    ("vad threshold negative", {"vad": {"threshold": -0.1}}, "spec.vad.threshold", "vad.threshold"),
    ("vad padding too long", {"vad": {"prefixPaddingMs": tj.VAD_MAX_PREFIX_PADDING_MS + 1}},
     "spec.vad.prefixPaddingMs", "vad.prefixPaddingMs"),
    ("vad silence negative", {"vad": {"silenceDurationMs": -1}}, "spec.vad.silenceDurationMs",
     "vad.silenceDurationMs"),
    ("vad silence too long", {"vad": {"silenceDurationMs": tj.VAD_MAX_SILENCE_DURATION_MS + 1}},
     "spec.vad.silenceDurationMs", "vad.silenceDurationMs"),
    ("vad silence fractional", {"vad": {"silenceDurationMs": 0.5}}, "spec.vad.silenceDurationMs",
     "vad.silenceDurationMs"),
]  # fmt: skip


@pytest.mark.parametrize(("what", "overrides", "server_field", "python_field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_hotwords_and_vad_are_refused_by_server_and_types(api, namespace, what, overrides, server_field,  # noqa: F811
                                                                  python_field):  # fmt: skip
    body = manifest("bad", **overrides)
    message = server_error(lambda: create(api, namespace, body))
    assert server_field in message, f"{what}: the server's message does not name {server_field}: {message}"
    with pytest.raises(ValidationError) as caught:
        tj.TranscriptionJobSpec.model_validate(body["spec"])
    locations = {".".join(str(part) for part in error["loc"]) for error in caught.value.errors()}
    assert any(loc.startswith(python_field) for loc in locations), f"{what}: pydantic named {locations}"


def test_hotwords_and_vad_at_their_bounds_are_accepted_and_parse_back(api, namespace):  # noqa: F811
    hotwords = [f"term{i}" for i in range(tj.MAX_HOTWORDS - 1)] + ["x" * tj.MAX_HOTWORD_LENGTH]
    vad = {"threshold": 1, "prefixPaddingMs": tj.VAD_MAX_PREFIX_PADDING_MS,
           "silenceDurationMs": tj.VAD_MAX_SILENCE_DURATION_MS}  # fmt: skip
    created = create(api, namespace, manifest("bounds", hotwords=hotwords, vad=vad, prompt="Context."))
    assert created["spec"]["hotwords"] == hotwords and created["spec"]["vad"] == vad
    spec = tj.TranscriptionJobSpec.model_validate(created["spec"])
    assert spec.vad.silence_duration_ms == tj.VAD_MAX_SILENCE_DURATION_MS and len(spec.hotwords) == tj.MAX_HOTWORDS
    zero = create(api, namespace, manifest("zero", vad={"threshold": 0, "prefixPaddingMs": 0, "silenceDurationMs": 0}))
    assert tj.TranscriptionJobSpec.model_validate(zero["spec"]).vad.threshold == 0


def test_kubectl_apply_takes_them_and_reports_a_bad_one(kube, tj_crd, namespace, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        f"apiVersion: {tj.API_VERSION}\nkind: {tj.KIND}\nmetadata:\n  name: tuned\n  namespace: {namespace}\n"
        "spec:\n  audio:\n    url: https://media.example.com/a.mp3\n  hotwords: [Ebenezer, Duguid]\n"
        "  vad:\n    threshold: 0.6\n    prefixPaddingMs: 100\n    silenceDurationMs: 300\n"
    )
    assert "created" in kubectl(kube, "apply", "-f", str(good))
    got = kubectl(kube, "get", "tj", "tuned", "-n", namespace, "-o", "jsonpath={.spec.hotwords} {.spec.vad}")
    assert got == '["Ebenezer","Duguid"] {"prefixPaddingMs":100,"silenceDurationMs":300,"threshold":0.6}'

    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("tuned", "mistuned").replace("threshold: 0.6", "threshold: 6"))
    import subprocess

    from tests.crds.test_contract import KUBECTL

    result = subprocess.run([KUBECTL, "--kubeconfig", str(kube.kubeconfig), "apply", "-f", str(bad)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode != 0 and "spec.vad.threshold" in result.stderr, result.stderr

    explained = kubectl(kube, "explain", "tj.spec.vad")
    for field in ("threshold", "prefixPaddingMs", "silenceDurationMs"):
        assert field in explained
    assert "faster-whisper's hotwords" in kubectl(kube, "explain", "tj.spec.hotwords")
