"""helm install / upgrade / uninstall against the real test kube-apiserver, and the pre-delete
hook's script against real TranscriptionJobs (ifw's finalizer removed, another tool's kept).

The test server has no controllers: nothing runs the pods, so no --wait, and uninstall runs
with --no-hooks (the hook Job would never complete); the hook's manifest is checked by
rendering (test_chart.py) and its script is run here directly, as the hook's pod would.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import httpx
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ifw.core.contract import FINALIZER
from ifw.crds.transcriptionjob import GROUP, PLURAL, VERSION
from tests.helm.conftest import CHART, GPU_VALUES, one
from tests.waiting import wait_for


def _release() -> str:
    # Cluster-scoped objects (ClusterRoles) carry the release name: unique per test run.
    return f"rel-{uuid.uuid4().hex[:6]}"  # without "ifw": objects are <release>-ifw-<component>


def _read(fn, *args):
    try:
        return fn(*args)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def test_install_upgrade_uninstall(helm, kube, namespace, tmp_path):
    release = _release()
    api = kube.api_client()
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    rbac_api, ext = client.RbacAuthorizationV1Api(api), client.ApiextensionsV1Api(api)
    custom = client.CustomObjectsApi(api)
    operator = f"{release}-ifw-operator"

    # ---- install (default values)
    out = helm.run("install", release, str(CHART), "-n", namespace, kubeconfig=kube.kubeconfig).stdout
    assert "STATUS: deployed" in out and "REVISION: 1" in out
    deployment = apps.read_namespaced_deployment(operator, namespace)
    assert deployment.spec.strategy.type == "Recreate" and deployment.spec.replicas == 1
    config = yaml.safe_load(core.read_namespaced_config_map(operator, namespace).data["operator.yaml"])
    assert config["max_active_jobs"] == 8
    role = rbac_api.read_cluster_role(operator)
    assert {r.resources[0] for r in role.rules} >= {"transcriptionjobs", "jobs", "secrets"}
    assert apps.read_namespaced_deployment(f"{release}-ifw-gateway", namespace).spec.template.spec.containers[0].command \
        == ["python", "-m", "ifw.gateway"]
    assert core.read_namespaced_service(f"{release}-ifw-gateway", namespace).spec.ports[0].port == 8000
    assert ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}")  # from the chart's crds/ (or already there)
    # Hooks are not installed with the release.
    assert _read(client.BatchV1Api(api).read_namespaced_job, f"{release}-ifw-cleanup", namespace) is None

    # NOTES.txt: its TranscriptionJob example is accepted by the real CRD (server-side dry run).
    assert f"svc/{release}-ifw-gateway" in out and "WARNING: no admin key is set" in out
    example = re.search(r"<<'YAML' \| kubectl apply -n (\S+) -f -\n(.*?)\n\s*YAML\n", out, re.S)
    assert example and example.group(1) == namespace
    manifest = yaml.safe_load(textwrap.dedent(example.group(2)))
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest, dry_run="All")
    assert created["spec"]["audio"]["url"] == "https://example.com/speech.mp3"

    # ---- upgrade: to the GPU production values (minus the ServiceMonitor: no Prometheus CRDs here)
    before = deployment.spec.template.metadata.annotations["checksum/config"]
    helm.run("upgrade", release, str(CHART), "-n", namespace, "-f", str(GPU_VALUES),
             "--set", "metrics.serviceMonitor.enabled=false", kubeconfig=kube.kubeconfig)
    status = json.loads(helm.run("status", release, "-n", namespace, "-o", "json",
                                 kubeconfig=kube.kubeconfig).stdout)
    assert status["version"] == 2 and status["info"]["status"] == "deployed"
    config = yaml.safe_load(core.read_namespaced_config_map(operator, namespace).data["operator.yaml"])
    assert config["max_active_jobs"] == 32 and config["runner"]["runtime_class_name"] == "nvidia"
    assert config["runner"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    deployment = apps.read_namespaced_deployment(operator, namespace)
    assert deployment.spec.template.metadata.annotations["checksum/config"] != before  # the pod rolls
    assert deployment.spec.template.spec.containers[0].image == "registry.example.com/ifw/ifw-operator:0.1.0"
    # The S3 result store reaches the operator and the gateway as stored by the apiserver.
    for name in (operator, f"{release}-ifw-gateway"):
        c = apps.read_namespaced_deployment(name, namespace).spec.template.spec.containers[0]
        env = {e.name: e.value for e in c.env}
        assert env["IFW_RESULT_STORE"] == "s3" and env["IFW_S3_BUCKET"] == "ifw-results", name
        assert [source.secret_ref.name for source in c.env_from] == ["ifw-s3"], name
    policies = client.NetworkingV1Api(api).list_namespaced_network_policy(namespace).items
    assert {p.metadata.name for p in policies} == {f"{release}-ifw-{c}" for c in ("operator", "gateway", "runner")}
    assert client.PolicyV1Api(api).read_namespaced_pod_disruption_budget(f"{release}-ifw-gateway", namespace)
    gateway = apps.read_namespaced_deployment(f"{release}-ifw-gateway", namespace)
    assert gateway.spec.replicas == 3
    admin_key = next(e for e in gateway.spec.template.spec.containers[0].env if e.name == "ADMIN_KEY")
    assert admin_key.value_from.secret_key_ref.name == "ifw-gateway-auth"  # the GPU values' existing Secret

    # ---- uninstall: every release object goes, the CRD stays (Helm never deletes crds/)
    helm.run("uninstall", release, "-n", namespace, "--no-hooks", kubeconfig=kube.kubeconfig)
    assert _read(apps.read_namespaced_deployment, operator, namespace) is None
    assert _read(core.read_namespaced_config_map, operator, namespace) is None
    assert _read(rbac_api.read_cluster_role, operator) is None
    assert _read(rbac_api.read_cluster_role_binding, operator) is None
    assert not client.NetworkingV1Api(api).list_namespaced_network_policy(namespace).items
    assert ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    listed = helm.run("list", "-n", namespace, "-q", kubeconfig=kube.kubeconfig).stdout
    assert release not in listed


def test_two_releases_do_not_collide(helm, kube, namespace):
    """Cluster-scoped names carry the release: a second install (e.g. a staging copy) works."""
    first, second = _release(), _release()
    for release in (first, second):
        out = helm.run("install", release, str(CHART), "-n", namespace, "--set", "gateway.enabled=false",
                       kubeconfig=kube.kubeconfig).stdout
        assert "kind: TranscriptionJob" in out and "port-forward" not in out  # NOTES without the gateway
    names = {r.metadata.name for r in client.RbacAuthorizationV1Api(kube.api_client()).list_cluster_role().items}
    assert {f"{first}-ifw-operator", f"{second}-ifw-operator"} <= names
    for release in (first, second):
        helm.run("uninstall", release, "-n", namespace, "--no-hooks", kubeconfig=kube.kubeconfig)


def test_install_with_the_pool(helm, kube, namespace):
    """The pool on the real apiserver: the worker Deployment, its Roles in the served namespaces
    and its own, the HPA (autoscaling/v2 is served; KEDA's CRD is not, see test_pool.py), and the
    operator watching the release namespace for the workers' Leases."""
    release = _release()
    api = kube.api_client()
    apps, core, rbac_api = client.AppsV1Api(api), client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    jobs_ns = f"{namespace[:50]}-jobs"
    core.create_namespace({"metadata": {"name": jobs_ns}})
    pool = f"{release}-ifw-pool"
    try:
        helm.run("install", release, str(CHART), "-n", namespace, "--set", "pool.enabled=true",
                 "--set-json", f'operator.watchNamespaces=["{jobs_ns}"]', "--set", "pool.autoscaling.enabled=true",
                 "--set", "pool.autoscaling.kind=hpa", "--set", "pool.autoscaling.minReplicas=1",
                 kubeconfig=kube.kubeconfig)
        deployment = apps.read_namespaced_deployment(pool, namespace)
        c = deployment.spec.template.spec.containers[0]
        assert c.command == ["python", "-m", "ifw.runner", "serve"]
        assert deployment.spec.template.spec.service_account_name == pool
        assert core.read_namespaced_service_account(pool, namespace)
        for ns in (jobs_ns, namespace):
            assert rbac_api.read_namespaced_role_binding(pool, ns).subjects[0].name == pool
        assert rbac_api.read_namespaced_role(f"{pool}-leases", namespace).rules[0].resources == ["leases"]
        assert _read(rbac_api.read_namespaced_role, f"{pool}-leases", jobs_ns) is None
        hpa = client.AutoscalingV2Api(api).read_namespaced_horizontal_pod_autoscaler(pool, namespace)
        assert hpa.spec.scale_target_ref.name == pool and hpa.spec.metrics[0].external.metric.name == \
            "ifw_operator_pool_demand"
        config = yaml.safe_load(core.read_namespaced_config_map(f"{release}-ifw-operator", namespace)
                                .data["operator.yaml"])
        assert config["namespaces"] == [jobs_ns, namespace] and config["pool"] == {"wait_seconds": 0, "ack_seconds": 30}
        helm.run("uninstall", release, "-n", namespace, "--no-hooks", kubeconfig=kube.kubeconfig)
        assert _read(apps.read_namespaced_deployment, pool, namespace) is None
        assert _read(rbac_api.read_namespaced_role, pool, jobs_ns) is None
    finally:
        core.delete_namespace(jobs_ns)


def _cleanup(kube, namespaces: list[str], delete: bool) -> subprocess.CompletedProcess:
    """The hook's script, as the hook pod runs it (python -c <files/cleanup.py>), with $KUBECONFIG."""
    env = {**os.environ, "KUBECONFIG": kube.kubeconfig,
           "IFW_CLEANUP_NAMESPACES": json.dumps(namespaces), "IFW_CLEANUP_DELETE": str(delete).lower()}
    script = (CHART / "files" / "cleanup.py").read_text()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_pre_delete_hook_script_strips_only_ifws_finalizer(kube, namespace, tj_crd):
    api = kube.api_client()
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    other = f"{namespace[:50]}-other"
    core.create_namespace({"metadata": {"name": other}})
    theirs = "example.com/keep"  # another tool's finalizer: its promise, not ours to break

    def create(ns: str, name: str, finalizers: list[str]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TranscriptionJob",
                "metadata": {"name": name, "finalizers": finalizers},
                "spec": {"audio": {"url": "https://media.example.com/a.mp3"}}}
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)

    def get(ns: str, name: str):
        return _read(custom.get_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, name)

    try:
        create(namespace, "stuck", [FINALIZER])
        create(namespace, "shared", [theirs, FINALIZER])
        create(namespace, "shared-deleting", [FINALIZER, theirs])
        create(namespace, "theirs", [theirs])
        create(namespace, "plain", [])
        create(other, "elsewhere", [FINALIZER])
        # Deletions that hang on the finalizers, as after the operator is gone.
        for name in ("stuck", "shared-deleting"):
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            assert get(namespace, name)["metadata"]["deletionTimestamp"]

        out = _cleanup(kube, [namespace], delete=False).stdout
        assert "5 TranscriptionJob(s) seen, 0 failure(s)" in out
        assert get(namespace, "stuck") is None  # its deletion completed
        assert get(namespace, "shared")["metadata"]["finalizers"] == [theirs]
        # Still deleting: the other tool's finalizer holds it, as that tool intends.
        assert get(namespace, "shared-deleting")["metadata"]["finalizers"] == [theirs]
        assert get(namespace, "theirs")["metadata"]["finalizers"] == [theirs]
        assert f"removed {FINALIZER} from {namespace}/theirs" not in out
        assert get(namespace, "plain") is not None  # not deleted without IFW_CLEANUP_DELETE
        assert get(other, "elsewhere")["metadata"]["finalizers"] == [FINALIZER]  # out of scope

        out = _cleanup(kube, [namespace], delete=True).stdout
        assert f"deleted {namespace}/plain" in out and f"deleted {namespace}/shared" in out
        left = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        # What another tool's finalizer holds stays, deleting, until that tool lets it go.
        assert {o["metadata"]["name"] for o in left} == {"shared", "shared-deleting", "theirs"}
        assert all(o["metadata"]["finalizers"] == [theirs] and o["metadata"]["deletionTimestamp"] for o in left)
        assert get(other, "elsewhere") is not None
    finally:
        for ns in (namespace, other):
            for o in custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]:
                custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, o["metadata"]["name"],
                                                      {"metadata": {"finalizers": None}})
                _read(custom.delete_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, o["metadata"]["name"])
        core.delete_namespace(other)


def test_pre_delete_hook_rereads_finalizers_that_changed_under_it(kube, namespace, tj_crd):
    """The hook's patch tests that the entry it removes is still ifw's: from a stale copy (another
    tool added its finalizer in front since the list was read) it reads the job again instead of
    removing the other tool's entry."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ifw_chart_cleanup", CHART / "files" / "cleanup.py")
    cleanup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cleanup)
    custom = client.CustomObjectsApi(kube.api_client())
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "TranscriptionJob",
        "metadata": {"name": "raced", "finalizers": [FINALIZER]},
        "spec": {"audio": {"url": "https://media.example.com/a.mp3"}}})
    stale = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "raced")
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "raced",
                                          {"metadata": {"finalizers": ["example.com/first", FINALIZER]}})
    assert stale["metadata"]["finalizers"] == [FINALIZER]  # index 0 is no longer ours
    try:
        assert cleanup.strip_finalizer(custom, stale) is True
        now = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "raced")
        assert now["metadata"]["finalizers"] == ["example.com/first"]
        assert cleanup.strip_finalizer(custom, now) is False  # nothing of ours left
    finally:
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "raced",
                                              {"metadata": {"finalizers": None}})


def test_uninstall_runs_the_pre_delete_hook(helm, kube, namespace, tj_crd):
    """helm uninstall with its hook: Helm creates the hook's account, Role and Job (in weight
    order) and waits for the Job; the test plays the Job controller and kubelet (runs the Job's
    own command and env, then marks it Complete), and the uninstall finishes, the stuck
    TranscriptionJob is gone and Helm has deleted the hook's objects."""
    release = _release()
    name = f"{release}-ifw-cleanup"
    api = kube.api_client()
    custom, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)
    core, rbac_api = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    helm.run("install", release, str(CHART), "-n", namespace, "--set", "cleanup.deleteJobs=true",
             "--set-json", f'operator.watchNamespaces=["{namespace}"]', kubeconfig=kube.kubeconfig)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "TranscriptionJob",
        "metadata": {"name": "stuck", "finalizers": [FINALIZER]},
        "spec": {"audio": {"url": "https://media.example.com/a.mp3"}}})

    uninstall = subprocess.Popen([helm.binary, "uninstall", release, "-n", namespace, "--timeout", "60s"],
                                 env={**helm.env, "KUBECONFIG": kube.kubeconfig},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = wait_for(lambda: _read(batch.read_namespaced_job, name, namespace), 30, "the hook Job")
        # Its account and RBAC came first (lower weight), limited to the watched namespace.
        assert core.read_namespaced_service_account(name, namespace)
        role = rbac_api.read_namespaced_role(name, namespace)
        assert role.rules[0].verbs == ["get", "list", "patch", "delete"]
        assert rbac_api.read_namespaced_role_binding(name, namespace).subjects[0].name == name
        # The kubelet's part: run the Job's container as specified.
        c = job.spec.template.spec.containers[0]
        env = {**os.environ, "KUBECONFIG": kube.kubeconfig, **{e.name: e.value for e in c.env}}
        run = subprocess.run([sys.executable, *c.command[1:]], env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert f"deleted {namespace}/stuck" in run.stdout
        # The Job controller's part.
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        batch.patch_namespaced_job_status(name, namespace, {"status": {
            "startTime": now, "completionTime": now, "succeeded": 1,
            "conditions": [{"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": now},
                           {"type": "Complete", "status": "True", "lastTransitionTime": now}]}})
        out, err = uninstall.communicate(timeout=60)
    finally:
        if uninstall.poll() is None:
            uninstall.kill()
            uninstall.communicate()
    assert uninstall.returncode == 0, err
    assert f'release "{release}" uninstalled' in out
    assert _read(custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, "stuck") is None
    # hook-delete-policy hook-succeeded: nothing of the hook is left behind.
    assert _read(batch.read_namespaced_job, name, namespace) is None
    assert _read(core.read_namespaced_service_account, name, namespace) is None
    assert _read(rbac_api.read_namespaced_role, name, namespace) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_operator_runs_from_the_rendered_chart(helm, kube, namespace, tj_crd, tmp_path):
    """The operator process, started the way the chart's Deployment starts it (its command, env
    and ConfigMap), answers the chart's probe and metrics ports and builds the GPU runner Job
    the GPU values describe."""
    liveness, metrics = _free_port(), _free_port()
    objects = helm.template("-f", str(GPU_VALUES), "--set-json", f'operator.watchNamespaces=["{namespace}"]',
                            "--set", f"operator.livenessPort={liveness}", "--set", f"operator.metricsPort={metrics}",
                            "--set", "operator.logFormat=plain")
    deployment = one(objects, "Deployment", "ifw-operator")
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    config_map = one(objects, "ConfigMap", "ifw-operator")
    config_file = tmp_path / "operator.yaml"
    config_file.write_text(config_map["data"]["operator.yaml"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("IFW_OPERATOR_")}
    env["KUBECONFIG"] = kube.kubeconfig
    for e in c["env"]:
        env[e["name"]] = e.get("value") or "whsec_dGVzdA=="  # valueFrom: the Secret's value
    env["IFW_OPERATOR_CONFIG_FILE"] = str(config_file)  # where the ConfigMap is mounted in the pod
    assert c["command"] == ["python", "-m", "ifw.operator"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    probe = c["livenessProbe"]["httpGet"]

    log = (tmp_path / "operator.log").open("w")
    proc = subprocess.Popen([sys.executable, *c["command"][1:]], env=env, cwd=tmp_path, stdout=log, stderr=log)
    try:
        with httpx.Client(timeout=2) as http:
            def healthy():
                if proc.poll() is not None:
                    raise AssertionError(f"operator exited {proc.returncode}: {(tmp_path / 'operator.log').read_text()}")
                try:
                    return http.get(f"http://127.0.0.1:{ports[probe['port']]}{probe['path']}").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(healthy, 60, "the operator's liveness endpoint")
            scrape = http.get(f"http://127.0.0.1:{ports['metrics']}/metrics")
            assert scrape.status_code == 200 and "ifw_operator_" in scrape.text

        custom, batch = client.CustomObjectsApi(kube.api_client()), client.BatchV1Api(kube.api_client())
        tj = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "TranscriptionJob", "metadata": {"name": "meeting"},
            "spec": {"audio": {"url": "https://media.example.com/meeting.mp3"}}})
        selector = f"{GROUP}/job-uid={tj['metadata']['uid']}"
        jobs = wait_for(lambda: batch.list_namespaced_job(namespace, label_selector=selector).items, 30,
                     "the runner Job")
        pod = jobs[0].spec.template.spec
        runner = pod.containers[0]
        assert runner.image == "registry.example.com/ifw/ifw-runner@sha256:" + "0123456789abcdef" * 4
        assert runner.resources.limits["nvidia.com/gpu"] == "1"
        assert any(t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" for t in pod.tolerations)
        assert pod.runtime_class_name == "nvidia" and pod.priority_class_name == "ifw-batch"
        assert pod.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        cache = next(v for v in pod.volumes if v.name == "model-cache")
        assert cache.host_path.path == "/var/cache/huggingface"
        runner_env = {e.name: e for e in runner.env}
        assert runner_env["HF_TOKEN"].value_from.secret_key_ref.name == "hf-token"
        assert runner_env["IFW_RESULT_STORE"].value == "s3" and runner_env["IFW_S3_BUCKET"].value == "ifw-results"
        assert [source.secret_ref.name for source in runner.env_from] == ["ifw-s3"]
        assert pod.security_context.run_as_user == 10001 and runner.security_context.read_only_root_filesystem
    finally:
        _stop(proc, log)


def test_gateway_runs_from_the_rendered_chart(helm, kube, namespace, tj_crd, tmp_path):
    """The gateway started with the chart's command and env serves its probes where the chart
    points them, and enforces the admin key it gets from the chart's Secret."""
    port = _free_port()
    objects = helm.template("--set", f"gateway.port={port}", "--set", f"gateway.namespace={namespace}",
                            "--set", "gateway.auth.adminKey=chart-admin-key")
    c = one(objects, "Deployment", "ifw-gateway")["spec"]["template"]["spec"]["containers"][0]
    secret = one(objects, "Secret", "ifw-gateway")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IFW_GATEWAY_") and k != "ADMIN_KEY"}
    env["KUBECONFIG"] = kube.kubeconfig
    for e in c["env"]:
        if "valueFrom" in e:  # what the kubelet would read from the chart's Secret
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        else:
            env[e["name"]] = e["value"]
    env["IFW_GATEWAY_UPLOAD_DIR"] = str(tmp_path / "uploads")  # the pod's /uploads volume
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    log = (tmp_path / "gateway.log").open("w")
    proc = subprocess.Popen([sys.executable, *c["command"][1:]], env=env, cwd=tmp_path, stdout=log, stderr=log)
    try:
        with httpx.Client(timeout=2) as http:
            def get(probe: str):
                if proc.poll() is not None:
                    raise AssertionError(f"gateway exited {proc.returncode}: {(tmp_path / 'gateway.log').read_text()}")
                httpget = c[probe]["httpGet"]
                try:
                    return http.get(f"http://127.0.0.1:{ports[httpget['port']]}{httpget['path']}")
                except httpx.HTTPError:
                    return None

            wait_for(lambda: (r := get("livenessProbe")) is not None and r.status_code == 200, 60, "gateway liveness")
            ready = wait_for(lambda: (r := get("readinessProbe")) is not None and r.status_code == 200 and r, 30,
                          "gateway readiness")
            assert ready.json()["checks"] == {"apiserver": "ok", "watch": "ok"}
            base = f"http://127.0.0.1:{port}"
            assert http.get(f"{base}/tasks").status_code == 401
            tasks = http.get(f"{base}/tasks", headers={"x-admin-api-key": "chart-admin-key"})
            assert tasks.status_code == 200, tasks.text
    finally:
        _stop(proc, log)


def _stop(proc: subprocess.Popen, log) -> None:
    """SIGTERM as the kubelet sends it; SIGKILL after the grace period."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


