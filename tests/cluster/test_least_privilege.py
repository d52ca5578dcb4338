"""Least privilege, shown against a real apiserver that enforces RBAC.

The whole stack runs on a control plane of its own with the audit log on: the operator (admin),
the kubelet stand-in (admin), the gateway as its chart ServiceAccount bound to the Role the real
`helm template` renders, and real runners (tiny.en) each as its Job's `<job>-runner`
ServiceAccount bound to the Role the operator makes (`runner_role_rules`). Every identity is an
x509 client certificate signed by the control plane's CA, so the audit events name it in
`user.username`.

Each call the gateway and the runners made becomes the PolicyRule {verb, group,
resource[/subresource], name}; Kubernetes' own comparison (validation.Covers, via
`ifw-test-apiserver covers`) then shows, per identity,
  1. allowed: the Role covers every call (the server enforced it too: its decision is in the event);
  2. nothing beyond: the calls (plus the exceptions listed below, with their reasons) cover the Role.
A Role that is too wide fails 2, one too narrow fails 1 (and the run itself: the server says 403).
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from kubernetes import client, config

from ifw.crds.transcriptionjob import GROUP, PLURAL, VERSION
from ifw.local.control_plane import ControlPlane, service_account_user
from ifw.local.crd import install_crd
from ifw.local.stack import LocalStack
from ifw.operator.jobs import runner_account_name, runner_role_rules
from tests.cluster.origin import Origin
from tests.cluster.rbac_covers import covers
from tests.helm.conftest import Helm, find_helm, one
from tests.speaking import speak
from tests.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.model]

NAMESPACE = "tenant-a"
SAID = "Please call me tomorrow morning."

# Grants no call in the recorded run uses, each with the reason it is kept. Empty today: the run
# exercises every rule of both Roles. Entries: identity ("runner" | "gateway") -> [(rule, reason)].
JUSTIFIED: dict[str, list[tuple[dict, str]]] = {"runner": [], "gateway": []}


# ------------------------------------------------------------------ the audit log -> rules


def request_rule(event: dict) -> dict:
    """The PolicyRule an authorizer checks for this audited request."""
    ref = event["objectRef"]
    resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    rule = {"verbs": [event["verb"]], "apiGroups": [ref.get("apiGroup", "")], "resources": [resource]}
    # A create names no object when it is authorized (the name is in the body); the audit event
    # gets it from the object afterwards.
    if ref.get("name") and not (event["verb"] == "create" and not ref.get("subresource")):
        rule["resourceNames"] = [ref["name"]]
    return rule


def read_audit(path: Path) -> dict[str, list[dict]]:
    """username -> its resource requests (one event per request; long ones log two stages)."""
    events: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event.get("objectRef") and event["stage"] in ("ResponseStarted", "ResponseComplete"):
            events[event["auditID"]] = event
    by_user: dict[str, list[dict]] = defaultdict(list)
    for event in events.values():
        by_user[event["user"]["username"]].append(event)
    return by_user


def distinct(rules: list[dict]) -> list[dict]:
    return [json.loads(r) for r in sorted({json.dumps(rule, sort_keys=True) for rule in rules})]


def without_names(rules: list[dict]) -> list[dict]:
    return distinct([{k: v for k, v in rule.items() if k != "resourceNames"} for rule in rules])


def not_allowed(role: list[dict], calls: list[dict]) -> list[dict]:
    """The calls (broken down) that the Role does not allow: empty when it allows them all."""
    return covers(role, calls)[1]


def granted_beyond(role: list[dict], calls: list[dict], justified: list[tuple[dict, str]]) -> list[dict]:
    """What the Role grants that neither a call nor a listed exception needs: empty when nothing."""
    return covers(calls + [rule for rule, _ in justified], role)[1]


# ------------------------------------------------------------------ the recorded run


@dataclass
class Recorded:
    gateway_user: str
    gateway_role: list[dict]
    gateway_calls: list[dict]  # request rules, with names
    runner_calls: dict[str, list[dict]]  # job name -> request rules, with names
    succeeded_job: str
    events: dict[str, list[dict]]  # username -> audit events



def _apply_chart_gateway_rbac(api: client.ApiClient, home: Path) -> tuple[str, list[dict]]:
    """Render the chart (real helm), create the gateway's ServiceAccount, Role and RoleBinding
    in NAMESPACE as rendered; return the account's username and the Role's rules."""
    objects = Helm(find_helm(), home).template(release="ifw", namespace=NAMESPACE)
    binding = one(objects, "RoleBinding", "ifw-gateway")
    role = one(objects, "Role", binding["roleRef"]["name"])
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NAMESPACE, subject
    account = one(objects, "ServiceAccount", subject["name"])
    client.CoreV1Api(api).create_namespaced_service_account(NAMESPACE, account)
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(NAMESPACE, role)
    rbac.create_namespaced_role_binding(NAMESPACE, binding)
    return service_account_user(NAMESPACE, subject["name"]), role["rules"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Recorded:
    work = tmp_path_factory.mktemp("least-privilege")
    audio = speak(SAID, work / "speech.wav")
    audit_log = work / "audit.log"
    with Origin() as origin, ControlPlane(audit_log=audit_log) as cp:
        admin = config.new_client_from_config(config_file=cp.kubeconfig)
        client.CoreV1Api(admin).create_namespace({"metadata": {"name": NAMESPACE}})
        install_crd(admin)
        gateway_user, gateway_role = _apply_chart_gateway_rbac(admin, work / "helm")
        gateway_account = gateway_user.rsplit(":", 1)[1]
        stack = LocalStack(
            work, "tiny.en", namespace=NAMESPACE, pool_workers=0,  # Job mode: the runner identities are under test
            gateway_kubeconfig=cp.service_account_kubeconfig(NAMESPACE, gateway_account),
            webhook_allowlist=["127.0.0.1"],
            gateway_env={"IFW_GATEWAY_SYNC_TIMEOUT_SECONDS": "300"},
        )
        custom = client.CustomObjectsApi(admin)
        try:
            stack.start(cp)
            succeeded = _exercise(stack, custom, origin, audio)
        except BaseException:
            for log in sorted(work.glob("*.log")) + sorted((work / "pods").glob("*.log")):
                print(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}")
            raise
        finally:
            stack.stop()
        events = read_audit(audit_log)  # complete: the log is written before each response

    gateway_calls = [request_rule(e) for e in events.get(gateway_user, [])]
    runner_calls = {}
    prefix = service_account_user(NAMESPACE, "")
    for username, user_events in events.items():
        if username.startswith(prefix) and username != gateway_user:
            account = username.removeprefix(prefix)
            job = account.removesuffix("-runner")
            assert runner_account_name(job) == account, f"an identity that is no runner: {username}"
            runner_calls[job] = [request_rule(e) for e in user_events]
    return Recorded(gateway_user, gateway_role, gateway_calls, runner_calls, succeeded, events)


def _exercise(stack: LocalStack, custom: client.CustomObjectsApi, origin: Origin, audio: Path) -> str:
    """Cancel, a refused duplicate, a sync upload that succeeds, a 404 that fails; returns the
    name of the job that succeeded."""
    base = origin.base
    hook = {"url": f"{base}/hook", "header": {"X-Token": "t0ken"}}  # headers: a Secret the gateway owns
    with httpx.Client(base_url=stack.gateway_url, timeout=300) as http:
        # 1. async with webhook headers; cancelled while its runner is fetching the audio
        body = {"url": f"{base}/slow.wav", "is_async": True, "managed_task_id": "cancel-me", "webhook": hook}
        answer = http.post("/", json=body)
        assert answer.status_code == 200, answer.text
        # 2. the same task id again: the gateway makes the headers Secret, the create is refused,
        #    and it deletes that Secret again
        again = http.post("/", json=body)
        assert again.status_code == 409, again.text
        assert origin.fetching.wait(240), "the runner never fetched the audio"
        cancelled = http.delete("/cancel/cancel-me")
        assert cancelled.status_code == 200, cancelled.text

        def gone() -> bool:
            try:
                custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, "cancel-me")
            except client.ApiException as error:
                return error.status == 404
            return False

        wait_for(gone, 60, "the cancelled TranscriptionJob to go")
        wait_for(lambda: all(r.process is None or r.process.poll() is not None for r in stack.node.runs.values()),
              60, "the cancelled runner to be stopped")
        origin.release.set()

        # 3. sync upload: a real runner transcribes it, the gateway reads the result Secret
        done = http.post("/", data={"language": "en"}, files={"file": ("speech.wav", audio.read_bytes(), "audio/wav")})
        assert done.status_code == 200, done.text
        task = done.json()["task_id"]
        assert "call me" in done.json()["output"]["text"].lower(), done.json()
        # who did the work (the original's fly_machine_id): the runner pod of the job's batch Job, on its node
        machine = done.json()["processed_by"]
        assert machine["runtime"] == "Job" and machine["node"], machine
        assert machine["pod"] in {run.pod_name for run in stack.node.runs.values()}, machine
        status = http.get(f"/status/{task}").json()
        assert status["status"] == "completed" and status["output"] == done.json()["output"], status

        # 4. sync, audio that is not there: the runner fails the job
        failed = http.post("/", json={"url": f"{base}/missing.wav", "managed_task_id": "missing-audio"})
        # a 4xx, or (a runner slower than the 30 s keep-alive on a loaded machine) a 200 already started
        # with spaces whose JSON body is the error: both are the gateway's documented failed answers
        assert failed.status_code != 200 or failed.json()["status"] == "error", failed.text
        status = http.get("/status/missing-audio").json()
        assert status["status"] == "error", status
    tj = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]
    return next(o["metadata"]["name"] for o in tj if (o.get("status") or {}).get("phase") == "Succeeded")


# ------------------------------------------------------------------ the proofs


def test_the_run_acted_as_the_chart_and_operator_identities(recorded):
    print("\nrecorded calls per identity:")
    for username in sorted(recorded.events):
        calls = distinct([request_rule(e) for e in recorded.events[username]])
        print(f"  {username}: {len(recorded.events[username])} requests, {len(calls)} distinct")
        if username.startswith("system:serviceaccount:"):
            for rule in calls:
                print(f"    {rule}")
    # The gateway and three runners (cancelled, succeeded, failed) acted as their accounts.
    assert recorded.gateway_calls, "no request by the gateway's ServiceAccount"
    assert {"cancel-me", "missing-audio", recorded.succeeded_job} <= set(recorded.runner_calls), recorded.runner_calls
    # The server enforced RBAC on each of their requests and allowed it.
    for username in [recorded.gateway_user, *(service_account_user(NAMESPACE, runner_account_name(job))
                                              for job in recorded.runner_calls)]:
        for event in recorded.events[username]:
            annotations = event.get("annotations") or {}
            assert annotations.get("authorization.k8s.io/decision") == "allow", event
            assert event["responseStatus"]["code"] != 403, event


def test_every_runner_call_is_allowed_by_its_jobs_role(recorded):
    for job, calls in recorded.runner_calls.items():
        assert calls, job
        assert not_allowed(runner_role_rules(job), calls) == [], f"runner of {job}"


def test_the_runner_role_grants_nothing_its_runner_did_not_use(recorded):
    job = recorded.succeeded_job  # the run that does all a runner does
    calls = recorded.runner_calls[job]
    # Names kept: its Role names its own objects, so another job's would be a grant beyond.
    assert granted_beyond(runner_role_rules(job), calls, JUSTIFIED["runner"]) == []


def test_every_gateway_call_is_allowed_by_the_chart_role(recorded):
    assert not_allowed(recorded.gateway_role, recorded.gateway_calls) == []


def test_the_gateway_role_grants_nothing_the_gateway_did_not_use(recorded):
    # Names dropped: the gateway acts on objects its clients name (task ids), so its Role cannot
    # name them; each verb on each resource must still be used.
    calls = without_names(recorded.gateway_calls)
    assert granted_beyond(recorded.gateway_role, calls, JUSTIFIED["gateway"]) == []


def test_the_check_refuses_a_widened_or_narrowed_role(recorded):
    job = recorded.succeeded_job
    runner = runner_role_rules(job)
    calls = recorded.runner_calls[job]
    result = f"{job}-result"
    # Widened: any Secret by name, and listing them.
    wider = [*runner, {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]
    assert granted_beyond(wider, calls, []) == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]},
    ]
    # Another job's status.
    other = [*runner, {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "resourceNames": ["other"],
                       "verbs": ["patch"]}]
    assert granted_beyond(other, calls, []) == [other[-1]]
    # Narrowed: no patch of the result Secret.
    narrower = [r for r in runner if r["resources"] != ["secrets"]]
    narrower.append({"apiGroups": [""], "resources": ["secrets"], "resourceNames": [result], "verbs": ["get"]})
    assert not_allowed(narrower, calls) == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [result], "verbs": ["patch"]}
    ]
    # The gateway: updating TranscriptionJobs granted (wider), deleting Secrets not (narrower).
    gateway, gateway_calls = recorded.gateway_role, recorded.gateway_calls
    wider = [*gateway, {"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["update"]}]
    assert granted_beyond(wider, without_names(gateway_calls), []) == [wider[-1]]
    narrower = [{**r, "verbs": [v for v in r["verbs"] if v != "delete"]} if r["resources"] == ["secrets"] else r
                for r in gateway]
    refused = not_allowed(narrower, gateway_calls)
    assert refused and all(r["verbs"] == ["delete"] and r["resources"] == ["secrets"] for r in refused), refused


# ------------------------------------------------------------------ the server enforces


def test_minted_service_account_is_held_to_its_role(kube, namespace):
    """No recorded run needed: a minted identity gets exactly what its binding grants, and the
    403 names the identity the certificate carries."""
    cp = kube.cp
    assert cp.can_mint, f"a {cp.source} control plane cannot mint identities"
    account = f"sa-{uuid.uuid4().hex[:6]}"
    with kube.api_client() as api:
        core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
        for name in ("mine", "theirs"):
            core.create_namespaced_secret(namespace, {"metadata": {"name": name}})
        mine = config.new_client_from_config(config_file=cp.service_account_kubeconfig(namespace, account))
        as_account = client.CoreV1Api(mine)

        def status(call, *args) -> int:
            try:
                call(*args)
            except client.ApiException as error:
                return error.status
            return 200

        first = status(as_account.read_namespaced_secret, "mine", namespace)
        assert first == 403
        rbac.create_namespaced_role(namespace, {"metadata": {"name": account}, "rules": [
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["mine"], "verbs": ["get"]}]})
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": account},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]})
        wait_for(lambda: status(as_account.read_namespaced_secret, "mine", namespace) == 200, 10,
              "the binding to take effect", interval=0.05)
        assert status(as_account.read_namespaced_secret, "theirs", namespace) == 403
        assert status(as_account.list_namespaced_secret, namespace) == 403
        assert status(as_account.patch_namespaced_secret, "mine", namespace, {"metadata": {"labels": {"a": "b"}}}) == 403
        assert status(as_account.read_namespace, namespace) == 403  # cluster-scoped: no RoleBinding reaches it
        try:
            as_account.read_namespaced_secret("theirs", namespace)
        except client.ApiException as error:
            assert f"system:serviceaccount:{namespace}:{account}" in error.body
        mine.close()
