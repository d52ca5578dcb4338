"""The warm pool in the chart, rendered by the real helm binary: the worker Deployment and its
settings (read back with the worker's and the runner's own settings classes), the same runner
settings as every runner Job the operator builds, its identity and Roles, the operator's
namespaces, and the autoscalers (KEDA ScaledObject, HPA).
"""

from __future__ import annotations

import copy
import math
import os
import re
import socket
import threading
import urllib.error
import urllib.request

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ifw.core.results import ResultSettings
from ifw.operator.jobs import runner_job
from tests.helm.conftest import CHART, GPU_VALUES, by_kind, one, pod_specs
from tests.helm.test_chart import K8S_VERSIONS, MINIO, NS, RELEASE, container, load_operator_settings
from tests.rbac_rules import allows

POOL = ("--set", "pool.enabled=true", "--set-json", 'operator.watchNamespaces=["team-a"]')
KEDA = (*POOL, "--set", "pool.autoscaling.enabled=true",
        "--set", "pool.autoscaling.keda.serverAddress=http://prometheus-operated.monitoring.svc:9090")
HPA = (*POOL, "--set", "pool.autoscaling.enabled=true", "--set", "pool.autoscaling.kind=hpa",
       "--set", "pool.autoscaling.minReplicas=1")
DEPLOYMENT = f"{RELEASE}-pool"
TJ = {"apiVersion": "ifw.dev/v1alpha1", "kind": "TranscriptionJob",
      "metadata": {"name": "standup", "namespace": "team-a", "uid": "0b5e7c1e-1111-2222-3333-444455556666"},
      "spec": {"audio": {"url": "https://media.example.com/a.mp3"}}}
# What the kubelet puts in the downward API fields of a pool pod.
POD = {"metadata.name": "ifw-pool-7c9d-x2k4q", "metadata.namespace": NS,
       "metadata.uid": "5f0c2d7a-aaaa-bbbb-cccc-ddddeeeeffff", "spec.nodeName": "gpu-node-3"}


def pool_container(objects) -> dict:
    return container(objects, "Deployment", DEPLOYMENT)


def pod_env(c: dict) -> dict[str, str]:
    """The container's environment as the kubelet gives it (Secrets as placeholders)."""
    env = {}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e["valueFrom"]:
            env[e["name"]] = POD[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[e["name"]] = "from-a-secret"
    return env


def settings_from(env: dict[str, str], monkeypatch, factory):
    with monkeypatch.context() as m:
        for key in list(os.environ):
            if key.upper().startswith("IFW_") or key.upper() in ("HF_TOKEN", "HF_HOME", "HF_HUB_OFFLINE"):
                m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        return factory()


# ---------------------------------------------------------------------------------- on, off, refused


def test_the_pool_is_off_by_default(helm):
    objects = helm.template()
    assert not [o for o in objects if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "pool"]


def test_the_pool_needs_the_namespaces_it_serves(helm):
    proc = helm.run("template", "x", str(CHART), "--set", "pool.enabled=true", check=False)
    assert proc.returncode != 0 and "pool.enabled needs operator.watchNamespaces" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--set-json", 'pool.models=["base"]'], "pool.models names base, which is neither"),
    (["--set-string", "runner.env.IFW_WORKER_CAPACITY=9"], "the runner env sets IFW_WORKER_CAPACITY"),
    (["--set", "pool.capacity=0"], "pool.capacity: Must be greater than or equal to 1"),
    (["--set", "pool.replica=2"], "Additional property replica is not allowed"),
    (["--set", "pool.gpu.count=-1"], "pool.gpu.count: Must be greater than or equal to 0"),
    (["--set", "pool.autoscaling.kind=vpa"], "pool.autoscaling.kind must be one of the following"),
    (["--set", "pool.autoscaling.keda.serverAddress=prometheus:9090"], "serverAddress: Does not match pattern"),
    (["--set", "pool.autoscaling.enabled=true"], "pool.autoscaling.keda.serverAddress is required"),
    (["--set", "pool.autoscaling.enabled=true", "--set", "pool.autoscaling.kind=hpa"],
     "minReplicas must be at least 1 with pool.autoscaling.kind hpa"),
    (["--set", "pool.autoscaling.enabled=true", "--set", "pool.autoscaling.kind=hpa",
      "--set", "pool.autoscaling.minReplicas=5"], "minReplicas is greater than pool.autoscaling.maxReplicas"),
])
def test_bad_pool_values_are_refused_naming_the_value(helm, args, message):
    proc = helm.run("template", "x", str(CHART), *POOL, *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


POOL_VARIANTS = {
    "pool": POOL,
    "gpu-production": ("-f", str(GPU_VALUES), *POOL, "--set", "metrics.serviceMonitor.enabled=false"),
    "keda": KEDA,
    "hpa": HPA,
    "s3": (*POOL, *MINIO),
    "cpu-pvc": (*POOL, "--set", "runner.gpu.count=0", "--set", "runner.modelCache.type=persistentVolumeClaim",
                "--set", "runner.modelCache.claimName=models", "--set", "runner.tolerations=null",
                "--set", "runner.workDirSizeLimit=null"),
    "no-rbac": (*POOL, "--set", "rbac.create=false", "--set", "serviceAccount.create=false",
                "--set", "serviceAccount.poolName=platform-pool"),
}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", sorted(POOL_VARIANTS))
def test_pool_variants_render_valid_restricted_objects(helm, variant, version):
    objects = helm.template(*POOL_VARIANTS[variant])
    for obj in objects:
        if obj["kind"] != "ScaledObject":  # a custom resource: see the KEDA tests below
            kubernetes_validate.validate(obj, version, strict=True)
    specs = dict(pod_specs(objects))
    spec = specs[f"Deployment/{DEPLOYMENT}"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    sc = spec["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}


# ---------------------------------------------------------------------------------- the worker's settings


def test_worker_env_is_the_workers_settings(helm, monkeypatch):
    from ifw.runner.worker import WorkerSettings

    objects = helm.template(*POOL, "--set", "pool.capacity=6", "--set", "pool.drainSeconds=45")
    c = pool_container(objects)
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names)), names
    fields = {f"IFW_WORKER_{name.upper()}" for name in WorkerSettings.model_fields}
    assert {n for n in names if n.startswith("IFW_WORKER_")} <= fields  # no misspelt setting
    worker = settings_from(pod_env(c), monkeypatch, WorkerSettings)
    assert worker.name == POD["metadata.name"] and worker.namespace == NS  # the Lease: the pod's name, its namespace
    assert worker.pod_uid == POD["metadata.uid"] and worker.node_name == POD["spec.nodeName"]
    assert worker.watch_namespaces == ["team-a", NS]  # exactly the operator's namespaces
    assert worker.models == ["openai/whisper-large-v3"]  # operator.defaultModel
    assert (worker.capacity, worker.drain_seconds, worker.max_audio_seconds) == (6, 45, 3600)
    assert c["command"] == ["python", "-m", "ifw.runner", "serve"]
    import importlib.util

    assert importlib.util.find_spec(c["command"][2]) is not None


def test_pool_models_are_offered_models(helm, monkeypatch):
    from ifw.runner.worker import WorkerSettings

    objects = helm.template(*POOL, "--set-json", 'operator.allowedModels=["base","tiny.en"]',
                            "--set-json", 'pool.models=["tiny.en","openai/whisper-large-v3"]')
    worker = settings_from(pod_env(pool_container(objects)), monkeypatch, WorkerSettings)
    assert worker.models == ["tiny.en", "openai/whisper-large-v3"]


def test_probes_grace_and_ports_match_the_worker(helm):
    """The probes hit the worker's health port, a startup probe covers the model load, and the
    pod's grace outlasts the worker's drain."""
    objects = helm.template(*POOL, "--set", "pool.healthPort=9181", "--set", "pool.drainSeconds=200",
                            "--set", "pool.startupSeconds=1205")
    spec = one(objects, "Deployment", DEPLOYMENT)["spec"]["template"]["spec"]
    c = spec["containers"][0]
    env = pod_env(c)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 9181} and env["IFW_WORKER_HEALTH_PORT"] == "9181"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    startup = c["startupProbe"]
    assert startup["httpGet"] == {"path": "/healthz", "port": "health"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1205
    assert spec["terminationGracePeriodSeconds"] > int(env["IFW_WORKER_DRAIN_SECONDS"]) == 200
    annotations = one(objects, "Deployment", DEPLOYMENT)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9181" and annotations["prometheus.io/path"] == "/metrics"


def test_the_probe_paths_answer_as_the_chart_expects():
    """The worker's health server: /healthz and /readyz 200 while it works, /readyz 503 while
    draining (so a draining worker is not Ready), /metrics for the scrape annotations."""
    from ifw.runner.worker import serve_health

    class Stub:
        draining = threading.Event()
        healthy = staticmethod(lambda: True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_health(Stub(), port)  # listening once it returns (the socket is bound in the constructor)

    def code(path: str) -> int:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status
        except urllib.error.HTTPError as error:
            return error.code

    assert (code("/healthz"), code("/readyz"), code("/metrics")) == (200, 200, 200)
    Stub.draining.set()
    assert (code("/healthz"), code("/readyz")) == (200, 503)


# ---------------------------------------------------------------------------------- the same as a runner Job


def _runner_settings(env: dict[str, str], monkeypatch):
    from ifw.runner.config import RunnerSettings

    def read():
        # a Job's own, and each pod's name and node (downward API)
        own = ("job_namespace", "job_name", "job_uid", "pod_name", "node_name")
        runner = {k: v for k, v in RunnerSettings().model_dump().items() if k not in own}
        return runner, ResultSettings().model_dump()

    return settings_from(env, monkeypatch, read)


AGREE = {
    "default": (),
    "gpu-production": ("-f", str(GPU_VALUES), "--set", "metrics.serviceMonitor.enabled=false"),
    "s3-minio": MINIO,
    "diarization-packaged": ("--set", "diarization.enabled=true", "--set", "diarization.pipeline=packaged"),
    "diarization-hub-token": ("--set", "diarization.enabled=true", "--set", "diarization.hfTokenSecret.name=hf"),
    "pvc-cache-models": ("--set", "runner.modelCache.type=persistentVolumeClaim",
                         "--set", "runner.modelCache.claimName=models", "--set", "runner.modelCache.hubOffline=true",
                         "--set-json", 'operator.allowedModels=["base"]'),
    # The runner's own env, reserved names among them, and settings only operator.yaml names.
    "runner-env-and-extra-config": ("--set-string", "runner.env.IFW_CPU_THREADS=4", "--set", "runner.env.HOME=/elsewhere",
                                    "--set", "operator.extraConfig.runner.work_dir=/tmp/work",
                                    "--set", "operator.extraConfig.runner.work_dir_size_limit=5Gi",
                                    "--set", "runner.workDirSizeLimit=null"),
}


@pytest.mark.parametrize("variant", sorted(AGREE))
def test_a_pool_worker_gets_what_a_runner_job_gets(helm, tmp_path, monkeypatch, variant):
    """The operator's own Job builder, from the settings the chart gives it, against the pool
    Deployment: the same runner env (the worker's and the Job's identity apart), secrets, cache
    volume and mount, image and security; and the runner reads the same settings from both."""
    objects = helm.template(*POOL, *AGREE[variant])
    job = runner_job(TJ, load_operator_settings(tmp_path, monkeypatch, objects))["spec"]["template"]["spec"]
    pool = one(objects, "Deployment", DEPLOYMENT)["spec"]["template"]["spec"]
    jc, pc = job["containers"][0], pool["containers"][0]

    def env(c: dict, own: str) -> dict[str, dict]:
        # IFW_SHARD_*: what Auto sharding means, for a Job's runner; a pool worker runs every job whole
        return {e["name"]: e for e in c["env"] if not e["name"].startswith((own, "IFW_SHARD_"))}

    assert env(pc, "IFW_WORKER_") == env(jc, "IFW_JOB_")
    assert pc.get("envFrom") == jc.get("envFrom")
    for key in ("image", "imagePullPolicy", "securityContext", "resources"):
        assert pc[key] == jc[key], key
    assert sorted(pc["volumeMounts"], key=str) == sorted(jc["volumeMounts"], key=str)
    assert sorted(pool["volumes"], key=str) == sorted(job["volumes"], key=str)
    for key in ("securityContext", "imagePullSecrets", "nodeSelector", "tolerations", "affinity",
                "runtimeClassName", "priorityClassName"):
        assert pool.get(key) == job.get(key), key
    # The runner's own settings classes read the same from both pods.
    job_env = {e["name"]: e.get("value", "from-a-secret") for e in jc["env"]}
    assert _runner_settings(pod_env(pc), monkeypatch) == _runner_settings(job_env, monkeypatch)


def test_the_agreement_check_can_fail(helm, tmp_path, monkeypatch):
    """A pool that got the result store from somewhere else would be caught above."""
    objects = helm.template(*POOL, *MINIO)
    job = runner_job(TJ, load_operator_settings(tmp_path, monkeypatch, objects))["spec"]["template"]["spec"]
    pc = copy.deepcopy(pool_container(objects))
    next(e for e in pc["env"] if e["name"] == "IFW_S3_BUCKET")["value"] = "another-bucket"
    job_env = {e["name"]: e.get("value", "from-a-secret") for e in job["containers"][0]["env"]}
    assert _runner_settings(pod_env(pc), monkeypatch) != _runner_settings(job_env, monkeypatch)


def test_pool_scheduling_and_gpus_may_differ_from_the_runners(helm):
    objects = helm.template("-f", str(GPU_VALUES), *POOL, "--set", "metrics.serviceMonitor.enabled=false",
                            "--set", "pool.gpu.count=2", "--set-json", "pool.nodeSelector={}",
                            "--set-json", 'pool.tolerations=[{"key":"pool","operator":"Exists"}]',
                            "--set", "pool.runtimeClassName=", "--set", "pool.priorityClassName=ifw-pool",
                            "--set-json", 'pool.resources={"requests":{"cpu":"16","memory":"64Gi"},"limits":{"memory":"96Gi"}}')
    spec = one(objects, "Deployment", DEPLOYMENT)["spec"]["template"]["spec"]
    assert "nodeSelector" not in spec and "runtimeClassName" not in spec  # explicitly none
    assert spec["tolerations"] == [{"key": "pool", "operator": "Exists"}]
    assert spec["priorityClassName"] == "ifw-pool"
    assert spec["containers"][0]["resources"] == {"requests": {"cpu": "16", "memory": "64Gi"},
                                                  "limits": {"memory": "96Gi", "nvidia.com/gpu": "2"}}
    assert "affinity" in spec  # null: the runner's
    cpu = one(helm.template(*POOL, "--set", "pool.gpu.count=0"), "Deployment", DEPLOYMENT)
    assert "nvidia.com/gpu" not in cpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


# ---------------------------------------------------------------------------------- identity and RBAC


def test_the_workers_identity_is_least_privilege(helm):
    objects = helm.template(*POOL)
    spec = one(objects, "Deployment", DEPLOYMENT)["spec"]["template"]["spec"]
    account = spec["serviceAccountName"]
    assert account == f"{RELEASE}-pool" and one(objects, "ServiceAccount", account)
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r["rules"]
             for r in by_kind(objects, "Role") if r["metadata"]["name"].startswith(f"{RELEASE}-pool")}
    served = [{"apiGroups": ["ifw.dev"], "resources": ["transcriptionjobs"], "verbs": ["list", "watch"]},
              {"apiGroups": ["ifw.dev"], "resources": ["transcriptionjobs/status"], "verbs": ["patch"]},
              {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "patch"]}]
    leases = [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create", "patch", "delete"]}]
    assert roles == {("team-a", f"{RELEASE}-pool"): served, (NS, f"{RELEASE}-pool"): served,
                     (NS, f"{RELEASE}-pool-leases"): leases}
    for binding in by_kind(objects, "RoleBinding"):
        if binding["metadata"]["name"].startswith(f"{RELEASE}-pool"):
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NS}]
            assert binding["roleRef"]["name"] == binding["metadata"]["name"]
    assert not [r for r in by_kind(objects, "ClusterRole") + by_kind(objects, "ClusterRoleBinding")
                if "pool" in r["metadata"]["name"]]
    rules = served + leases
    assert not allows(rules, "list", "", "secrets")  # never enumerate Secrets
    assert not allows(rules, "patch", "ifw.dev", "transcriptionjobs", "x")  # spec and metadata are not its
    assert not allows(rules, "create", "", "pods") and not allows(rules, "get", "coordination.k8s.io", "leases", "x")


def test_the_s3_store_needs_no_secret_access(helm):
    objects = helm.template(*POOL, *MINIO)
    for role in by_kind(objects, "Role"):
        if role["metadata"]["name"] == f"{RELEASE}-pool":
            assert not allows(role["rules"], "get", "", "secrets", "x-result"), role["metadata"]["namespace"]


def test_existing_account_without_rbac(helm):
    objects = helm.template(*POOL_VARIANTS["no-rbac"])
    assert one(objects, "Deployment", DEPLOYMENT)["spec"]["template"]["spec"]["serviceAccountName"] == "platform-pool"
    assert not {o["kind"] for o in objects} & {"Role", "RoleBinding", "ServiceAccount"}


def test_the_operator_watches_the_pools_namespace(helm, tmp_path, monkeypatch):
    """kopf sees Leases only where the operator watches: the release namespace joins the list,
    with the operator's Role there (Leases included) and the hook's."""
    objects = helm.template(*POOL, "--set", "pool.waitSeconds=120")
    settings = load_operator_settings(tmp_path, monkeypatch, objects)
    assert settings.namespaces == ["team-a", NS]
    assert settings.pool.wait_seconds == 120
    operator_roles = {r["metadata"]["namespace"]: r["rules"] for r in by_kind(objects, "Role")
                      if r["metadata"]["name"] == f"{RELEASE}-operator"}
    assert set(operator_roles) == {"team-a", NS}
    assert allows(operator_roles[NS], "watch", "coordination.k8s.io", "leases")
    hook = {r["metadata"]["namespace"] for r in by_kind(objects, "Role") if r["metadata"]["name"] == f"{RELEASE}-cleanup"}
    assert hook == {"team-a", NS}
    env = {e["name"]: e["value"] for e in container(objects, "Job", f"{RELEASE}-cleanup")["env"]}
    assert yaml.safe_load(env["IFW_CLEANUP_NAMESPACES"]) == ["team-a", NS]
    # Already listed: not twice.
    twice = helm.template("--set", "pool.enabled=true", "--set-json", f'operator.watchNamespaces=["{NS}","team-a"]')
    assert load_operator_settings(tmp_path, monkeypatch, twice).namespaces == [NS, "team-a"]
    # Without the pool the list is the operator's own.
    alone = helm.template("--set-json", 'operator.watchNamespaces=["team-a"]')
    assert load_operator_settings(tmp_path, monkeypatch, alone).namespaces == ["team-a"]


def test_network_policies_cover_the_pool(helm):
    objects = helm.template("-f", str(GPU_VALUES), *POOL, "--set", "metrics.serviceMonitor.enabled=false")
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(objects, "NetworkPolicy")}
    assert policies[f"{RELEASE}-pool"]["egress"] == policies[f"{RELEASE}-runner"]["egress"]
    assert policies[f"{RELEASE}-pool"]["podSelector"]["matchLabels"] == \
        one(objects, "Deployment", DEPLOYMENT)["spec"]["selector"]["matchLabels"]
    peers = policies[f"{RELEASE}-gateway"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": one(objects, "Deployment", DEPLOYMENT)["spec"]["selector"]["matchLabels"]}} \
        in peers  # workers fetch uploads too


# ---------------------------------------------------------------------------------- autoscaling

# KEDA's ScaledObject (keda.sh/v1alpha1), the fields of its published CRD (kedacore/keda,
# config/crd/bases/keda.sh_scaledobjects.yaml) that this chart may set, written out here: the
# CRD is not installed on the test apiserver. Unknown fields are errors, as the CRD's pruning
# would silently drop them. HPA behavior is checked by Kubernetes' own schema below.
_BEHAVIOR = {"type": "object"}
KEDA_SCALEDOBJECT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object", "additionalProperties": False, "required": ["name"],
                    "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                   "name": {"type": "string"}, "envSourceContainerName": {"type": "string"}},
                },
                "pollingInterval": {"type": "integer"},
                "cooldownPeriod": {"type": "integer"},
                "initialCooldownPeriod": {"type": "integer"},
                "idleReplicaCount": {"type": "integer"},
                "minReplicaCount": {"type": "integer"},
                "maxReplicaCount": {"type": "integer"},
                "advanced": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object", "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": _BEHAVIOR},
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "fallback": {"type": "object", "required": ["failureThreshold", "replicas"]},
                "triggers": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "authenticationRef": {
                                "type": "object", "additionalProperties": False, "required": ["name"],
                                "properties": {"name": {"type": "string"},
                                               "kind": {"enum": ["TriggerAuthentication",
                                                                 "ClusterTriggerAuthentication"]}},
                            },
                        },
                    },
                },
            },
        },
    },
}
# The prometheus scaler's metadata keys (KEDA's pkg/scalers/prometheus_scaler.go) and the ones it needs.
PROMETHEUS_METADATA = {"serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
                       "ignoreNullValues", "unsafeSsl", "queryParameters", "timeout", "awsRegion", "identityOwner"}
PROMETHEUS_REQUIRED = {"serverAddress", "query", "threshold"}


def validate_scaled_object(obj: dict) -> None:
    jsonschema.validate(obj, KEDA_SCALEDOBJECT)
    spec = obj["spec"]
    # The CRD's CEL rule.
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100), "minReplicaCount > maxReplicaCount"
    for trigger in spec["triggers"]:
        if trigger["type"] == "prometheus":
            keys = set(trigger["metadata"])
            assert PROMETHEUS_REQUIRED <= keys <= PROMETHEUS_METADATA, keys
            float(trigger["metadata"]["threshold"])
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:  # KEDA copies it into the HPA it makes: Kubernetes' schema decides
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
               "spec": {"scaleTargetRef": spec["scaleTargetRef"], "maxReplicas": spec.get("maxReplicaCount", 100),
                        "behavior": behavior}}
        kubernetes_validate.validate(hpa, K8S_VERSIONS[-1], strict=True)


def test_keda_scales_the_pool_on_the_operators_demand(helm):
    objects = helm.template(*KEDA, "--set", "pool.capacity=3", "--set", "pool.autoscaling.maxReplicas=8",
                            "--set-json", 'pool.autoscaling.keda.authenticationRef={"name":"prom-auth"}')
    deployment = one(objects, "Deployment", DEPLOYMENT)
    assert "replicas" not in deployment["spec"]  # KEDA owns the count: an upgrade must not reset it
    so = one(objects, "ScaledObject", DEPLOYMENT)
    validate_scaled_object(so)
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": DEPLOYMENT}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (0, 8, 300)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["authenticationRef"] == {"name": "prom-auth"}
    meta = trigger["metadata"]
    assert meta["serverAddress"] == "http://prometheus-operated.monitoring.svc:9090"
    assert meta["threshold"] == "3"  # jobs per worker: pool.capacity
    assert meta["query"] == f'sum(ifw_operator_pool_jobs{{namespace="{NS}",state=~"waiting|assigned"}})'
    assert meta["activationThreshold"] == "0"
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] == 300
    # The target may be set below capacity (scale out before the workers are full).
    target = one(helm.template(*KEDA, "--set", "pool.autoscaling.targetJobsPerWorker=2"), "ScaledObject", DEPLOYMENT)
    assert target["spec"]["triggers"][0]["metadata"]["threshold"] == "2"


def test_the_scaled_object_check_can_fail(helm):
    so = one(helm.template(*KEDA), "ScaledObject", DEPLOYMENT)
    for breakage in (lambda s: s["spec"].update(minReplicas=0),  # not KEDA's name for it
                     lambda s: s["spec"]["triggers"][0]["metadata"].update(threshold=4),  # not a string
                     lambda s: s["spec"]["triggers"][0]["metadata"].pop("serverAddress"),
                     lambda s: s["spec"].update(minReplicaCount=9, maxReplicaCount=2),
                     lambda s: s["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
                     .update(stabilisationWindowSeconds=1)):
        broken = copy.deepcopy(so)
        breakage(broken)
        with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError, AssertionError)):
            validate_scaled_object(broken)


def test_the_demand_query_reads_what_the_operator_exports():
    """The query's metric and label values are the operator's, and its sum over the scraped
    samples is waiting + assigned pool jobs: with 3 waiting and 5 assigned and 4 jobs per
    worker, the autoscaler wants ceil(8 / 4) = 2 workers."""
    from ifw.operator.metrics import StateCollector

    stats = {"waiting": 3, "assigned": 5, "workers_ready": 1, "workers_draining": 0, "capacity": 4}
    families = {f.name: f for f in StateCollector(lambda: [], lambda: 0, lambda: 0, lambda: stats).collect()}
    query = 'sum(ifw_operator_pool_jobs{namespace="ifw-system",state=~"waiting|assigned"})'
    name, states = re.fullmatch(r'sum\((\w+)\{namespace="[^"]+",state=~"([^"]+)"\}\)', query).groups()
    assert name in families
    samples = {s.labels["state"]: s.value for s in families[name].samples}
    assert set(states.split("|")) <= set(samples), samples
    demand = sum(v for state, v in samples.items() if re.fullmatch(states, state))
    assert demand == 8 and math.ceil(demand / 4) == 2


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_hpa_alternative_on_an_external_metric(helm, version):
    objects = helm.template(*HPA, "--set", "pool.autoscaling.maxReplicas=6", "--set", "pool.capacity=5")
    assert "replicas" not in one(objects, "Deployment", DEPLOYMENT)["spec"]
    hpa = one(objects, "HorizontalPodAutoscaler", DEPLOYMENT)
    kubernetes_validate.validate(hpa, version, strict=True)
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": DEPLOYMENT}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 6)
    (metric,) = spec["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"] == {"name": "ifw_operator_pool_demand",
                                            "selector": {"matchLabels": {"namespace": NS}}}
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "5"}
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert not by_kind(objects, "ScaledObject")
    # The README's adapter rule serves that metric name from the operator's series.
    readme = (CHART / "README.md").read_text()
    assert "ifw_operator_pool_demand" in readme and 'seriesQuery: ifw_operator_pool_jobs' in readme


def test_the_pool_skips_the_env_names_the_operator_reserves():
    """The Deployment drops from the runner env the names the operator sets itself on a Job."""
    from ifw.operator.jobs import RESERVED_ENV

    template = (CHART / "templates" / "pool-deployment.yaml").read_text()
    listed = re.search(r'\$reserved := list ((?:"[A-Z_]+" ?)+)', template).group(1)
    assert set(re.findall(r'"([A-Z_]+)"', listed)) == set(RESERVED_ENV)
