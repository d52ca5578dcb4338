"""The Argo CD health check (helm/ifw/files/argocd-health.lua), run as Argo CD runs it.

Argo CD (gopher-lua, Lua 5.1) decodes the live object into Lua tables (maps to tables, lists to
tables indexed from 1, null to nil), sets it as the global `obj`, runs the script and reads the
table it returns: `hs.status` one of Healthy, Progressing, Degraded, Suspended, `hs.message`.
Here lupa's Lua 5.1 does the same with TranscriptionJobs as the real apiserver serves them (CRD
defaults applied, status written through /status as the operator writes it).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from kubernetes import client

from ifw.crds.transcriptionjob import GROUP, PLURAL, VERSION
from tests.helm.conftest import CHART, ROOT

SCRIPT = CHART / "files" / "argocd-health.lua"
ARGOCD_KEY = "resource.customizations.health.ifw.dev_TranscriptionJob"
STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def _to_lua(lua, value: Any):
    """JSON as Argo CD hands it to Lua: objects and arrays become tables, null becomes nil."""
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items() if v is not None})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value if v is not None])
    return value


def argo_health(obj: dict[str, Any]) -> dict[str, Any]:
    from lupa import lua51

    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _to_lua(lua, obj)
    hs = lua.execute(SCRIPT.read_text())
    assert hs is not None, "the script returned nothing"
    result = dict(hs.items())
    assert set(result) <= {"status", "message"}, result
    assert result["status"] in STATUSES, result
    assert isinstance(result.get("message"), str) and result["message"], result
    return result


def _status(phase: str, reason: str, message: str, **extra: Any) -> dict[str, Any]:
    now = "2026-12-01T10:00:00Z"
    condition = {"type": phase if phase in ("Running", "Succeeded", "Failed", "Queued") else "Queued",
                 "status": "True", "reason": reason, "message": message, "lastTransitionTime": now}
    return {"phase": phase, "reason": reason, "message": message, "conditions": [condition], **extra}


# name -> (spec overrides, status, expected health, text the message must contain)
CASES = {
    "pending": ({}, _status("Pending", "Assigned", "assigned to pool worker w-1, attempt 1"),
                "Progressing", "Pending: assigned to pool worker w-1"),
    "queued": ({}, _status("Queued", "WaitingForWorker", "waiting for a pool worker with a free slot"),
               "Progressing", "Queued: waiting for a pool worker"),
    "running": ({}, _status("Running", "Running", "pool worker w-1 is working on it",
                            progress={"percent": 42.5, "processedSeconds": 255.0, "totalSeconds": 600.0}),
                "Progressing", "Running: pool worker w-1 is working on it (42%)"),
    "suspended": ({"suspend": True}, _status("Queued", "Suspended", "spec.suspend is true; set it to false to run the job"),
                  "Suspended", "spec.suspend is true"),
    "suspended-not-yet-seen": ({"suspend": True}, None, "Suspended", "spec.suspend is true"),
    "succeeded": ({}, _status("Succeeded", "Completed", "the transcript is ready",
                              completionTime="2026-12-01T10:05:00Z"), "Healthy", "the transcript is ready"),
    "failed": ({}, _status("Failed", "AudioFetchFailed", "GET https://media.example.com/a.mp3: 404"),
               "Degraded", "AudioFetchFailed: GET https://media.example.com/a.mp3: 404"),
    # Finished stays finished: suspending a done job does not make it Suspended.
    "succeeded-then-suspended": ({"suspend": True}, _status("Succeeded", "Completed", "the transcript is ready"),
                                 "Healthy", "the transcript is ready"),
    "new": ({}, None, "Progressing", "waiting for the operator"),
}


@pytest.fixture(scope="module")
def served(kube, tj_crd) -> dict[str, dict[str, Any]]:
    """Each case's TranscriptionJob as the real apiserver serves it back."""
    import uuid

    ns = f"t-argocd-{uuid.uuid4().hex[:6]}"
    with kube.api_client() as api:
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        core.create_namespace({"metadata": {"name": ns}})
        out = {}
        try:
            for name, (spec, status, _, _) in CASES.items():
                custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {
                    "apiVersion": f"{GROUP}/{VERSION}", "kind": "TranscriptionJob", "metadata": {"name": name},
                    "spec": {"audio": {"url": "https://media.example.com/a.mp3"}, **spec}})
                if status:
                    custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, name, {"status": status})
                out[name] = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        finally:
            core.delete_namespace(ns)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_health_of_each_phase_as_argo_cd_computes_it(served, case):
    spec, status, expected, text = CASES[case]
    obj = served[case]
    if status:  # the status went through the CRD's schema: nothing pruned that the check reads
        assert obj["status"]["phase"] == status["phase"] and obj["status"]["message"] == status["message"]
    hs = argo_health(obj)
    assert hs["status"] == expected, hs
    assert text in hs["message"], hs


def test_the_check_reads_the_object_not_a_default():
    """Toothless otherwise: the same script gives different answers for different objects."""
    base = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TranscriptionJob", "metadata": {"name": "x"},
            "spec": {"audio": {"url": "https://a.example/a.mp3"}, "suspend": False}}
    answers = {argo_health({**base, "status": {"phase": phase, "message": f"m-{phase}"}})["status"]
               for phase in ("Pending", "Succeeded", "Failed")}
    assert answers == {"Progressing", "Healthy", "Degraded"}
    failed = argo_health({**base, "status": {"phase": "Failed"}})  # no reason, no message
    assert failed == {"status": "Degraded", "message": "the job failed"}


def test_the_script_is_lua_5_1_and_leaks_no_globals():
    """Argo CD runs gopher-lua (5.1): the script must not need a newer Lua, and must not leave
    globals behind (Argo CD reuses its Lua state pool)."""
    from lupa import lua51

    lua = lua51.LuaRuntime()
    assert lua.eval("_VERSION") == "Lua 5.1"
    before = set(lua.globals().keys())
    lua.globals().obj = lua.table_from({"status": lua.table_from({"phase": "Running"})})
    lua.execute(SCRIPT.read_text())
    assert set(lua.globals().keys()) - before == {"obj"}


def test_the_docs_name_the_argocd_cm_key_and_the_file():
    for doc in (CHART / "README.md", ROOT / "README.md"):
        text = doc.read_text()
        if "argocd" not in text.lower():
            continue
        assert ARGOCD_KEY in text, doc
        assert "argocd-health.lua" in text, doc
    assert ARGOCD_KEY in (CHART / "README.md").read_text()
    assert re.search(r"resource\.customizations\.health\.ifw\.dev_TranscriptionJob", SCRIPT.read_text())


def test_a_job_being_deleted_is_progressing_whatever_its_phase():
    obj = {"metadata": {"name": "x", "deletionTimestamp": "2026-12-01T12:00:00Z", "finalizers": ["ifw.dev/cleanup"]},
           "spec": {"audio": {"url": "https://x/a.mp3"}}, "status": {"phase": "Running"}}  # fmt: skip
    hs = argo_health(obj)
    assert hs["status"] == "Progressing" and "being deleted" in hs["message"]

