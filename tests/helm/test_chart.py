"""The Helm chart, rendered by the real helm binary: lint, schema, Kubernetes validation, and
the contracts with the code it deploys (the operator's settings file and RBAC, the gateway's
settings, the runner Job the operator builds from the chart's values).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from ifw.core.results import ResultSettings
from ifw.crds.generate import CRD_PATH
from ifw.gateway.config import GatewaySettings
from ifw.operator import rbac
from ifw.operator.config import OperatorSettings
from ifw.operator.jobs import runner_job
from tests.helm.conftest import CHART, GPU_VALUES, ROOT, by_kind, one, pod_specs
from tests.rbac_rules import allows

K8S_VERSIONS = ["1.31.0", "1.35.0"]  # the oldest supported (podFailurePolicy GA) and a current one
NOT_BUILT_IN = {"ServiceMonitor"}  # custom resources: no schema in kubernetes-validate
GPU = ("-f", str(GPU_VALUES))
RELEASE, NS = "ifw", "ifw-system"
# The S3 result store on a self-hosted MinIO, every setting given.
MINIO = ("--set", "results.store=s3", "--set", "results.s3.bucket=transcripts",
         "--set", "results.s3.endpointUrl=http://minio.storage.svc:9000", "--set", "results.s3.prefix=ifw/",
         "--set", "results.s3.region=eu-central-1", "--set", "results.s3.credentialsSecret=minio-creds")


@pytest.fixture(scope="module")
def default_objects(helm):
    return helm.template("--include-crds")


@pytest.fixture(scope="module")
def gpu_objects(helm):
    return helm.template("--include-crds", *GPU)


def operator_yaml(objects) -> dict:
    return yaml.safe_load(one(objects, "ConfigMap", f"{RELEASE}-operator")["data"]["operator.yaml"])


def container(objects, kind: str, name: str) -> dict:
    return one(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]


def load_operator_settings(tmp_path: Path, monkeypatch, objects) -> OperatorSettings:
    """OperatorSettings exactly as the operator pod loads them: the mounted file plus env."""
    deployment = one(objects, "Deployment", f"{RELEASE}-operator")
    spec = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    path = Path(env["IFW_OPERATOR_CONFIG_FILE"]["value"])
    # The file the env names is the one the ConfigMap volume provides.
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in spec["volumes"] if v["name"] == "config")
    assert str(path.parent) == mount["mountPath"]
    assert volume["configMap"]["name"] == f"{RELEASE}-operator"
    data = one(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    assert path.name in data
    local = tmp_path / path.name
    local.write_text(data[path.name])
    for key in list(os.environ):
        if key.startswith("IFW_OPERATOR_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("IFW_OPERATOR_CONFIG_FILE", str(local))
    if "IFW_OPERATOR_WEBHOOK__SIGNING_SECRET" in env:  # from a Secret in the cluster
        monkeypatch.setenv("IFW_OPERATOR_WEBHOOK__SIGNING_SECRET", "whsec_dGVzdA==")
    return OperatorSettings()


# ---------------------------------------------------------------------------------- static


def test_missing_helm_fails_instead_of_skipping(monkeypatch, tmp_path):
    from tests.helm import conftest

    monkeypatch.setattr(conftest, "ROOT", tmp_path)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="install-helm.sh"):
        conftest.find_helm()


def test_chart_crd_is_the_generated_crd_byte_for_byte():
    chart_crd = CHART / "crds" / "transcriptionjob.yaml"
    assert chart_crd.read_bytes() == CRD_PATH.read_bytes(), (
        "helm/ifw/crds/transcriptionjob.yaml differs from crds/transcriptionjob.yaml: "
        "run `python -m ifw.crds` (it writes both copies)"
    )
    assert [p.name for p in (CHART / "crds").iterdir()] == ["transcriptionjob.yaml"]


@pytest.mark.parametrize("values", [(), GPU], ids=["default", "gpu-production"])
def test_helm_lint_strict(helm, values):
    out = helm.run("lint", "--strict", str(CHART), *values).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", ["default", "gpu"])
def test_every_rendered_object_validates(request, values, version):
    objects = request.getfixturevalue(f"{values}_objects")
    kinds = {o["kind"] for o in objects}
    assert {"CustomResourceDefinition", "Deployment", "ConfigMap", "ServiceAccount", "Service", "Job"} <= kinds
    for obj in objects:
        if obj["kind"] in NOT_BUILT_IN:
            continue
        kubernetes_validate.validate(obj, version, strict=True)  # raises on any error


VARIANTS = {
    "gateway-off": ["--set", "gateway.enabled=false"],
    "namespaced": ["--set-json", 'operator.watchNamespaces=["team-a"]', "--set", "gateway.namespace=team-a"],
    "no-metrics": ["--set", "operator.metricsPort=null", "--set", "metrics.podAnnotations=false"],
    "no-rbac": ["--set", "rbac.create=false", "--set", "serviceAccount.create=false"],
    "cpu-pvc-cache": ["--set", "runner.gpu.count=0", "--set", "runner.modelCache.type=persistentVolumeClaim",
                      "--set", "runner.modelCache.claimName=models", "--set", "runner.tolerations=null"],
    "s3-results": MINIO,
    "secrets": ["--set", "gateway.auth.adminKey=k", "--set", "operator.webhook.signingSecret=whsec_a2V5",
                "--set-json", 'gateway.auth.tenantKeys={"team-b":"k2"}'],
    "hardened": ["--set", "networkPolicy.enabled=true", "--set", "networkPolicy.runnerEgress.enabled=true",
                 "--set-json", 'networkPolicy.runnerEgress.apiServerCIDRs=["192.0.2.10/32"]',
                 "--set", "gateway.replicaCount=2", "--set", "gateway.uploads.claimName=uploads",
                 "--set", "gateway.podDisruptionBudget.enabled=true", "--set", "cleanup.enabled=false"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_value_variants_render_valid_objects(helm, variant):
    objects = helm.template(*VARIANTS[variant])
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    for name, spec in pod_specs(objects):
        assert spec["securityContext"]["runAsNonRoot"] is True, (variant, name)


def test_several_gateway_replicas_need_a_shared_upload_volume(helm):
    proc = helm.run("template", "x", str(CHART), "--set", "gateway.replicaCount=2", check=False)
    assert proc.returncode != 0 and "needs gateway.uploads.claimName" in proc.stderr
    helm.template("--set", "gateway.replicaCount=2", "--set", "gateway.uploads.enabled=false")


def test_validator_is_strict(default_objects):
    """The validation above can fail: a misspelt field in a Deployment is refused."""
    deployment = copy.deepcopy(one(default_objects, "Deployment", f"{RELEASE}-operator"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_service_monitors_select_the_metrics_services(gpu_objects):
    monitors = by_kind(gpu_objects, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {f"{RELEASE}-operator", f"{RELEASE}-gateway"}
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        selector = monitor["spec"]["selector"]["matchLabels"]
        port = monitor["spec"]["endpoints"][0]["port"]
        services = [s for s in by_kind(gpu_objects, "Service")
                    if selector.items() <= s["metadata"]["labels"].items()]
        assert len(services) == 1, monitor["metadata"]["name"]
        assert port in {p["name"] for p in services[0]["spec"]["ports"]}


@pytest.mark.parametrize("values", ["default", "gpu"])
def test_every_pod_is_restricted(request, values):
    objects = request.getfixturevalue(f"{values}_objects")
    specs = pod_specs(objects)
    assert len(specs) == 3, [name for name, _ in specs]  # operator, gateway, cleanup hook
    for name, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert c["resources"].get("requests") and c["resources"].get("limits", {}).get("memory"), name


def test_operator_deployment_is_one_replica_recreate_with_kopf_probes(default_objects):
    deployment = one(default_objects, "Deployment", f"{RELEASE}-operator")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "ghcr.io/ifw/ifw-operator:0.1.0"  # appVersion
    assert c["command"] == ["python", "-m", "ifw.operator"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    config = operator_yaml(default_objects)
    # kopf's liveness endpoint and the metrics server listen where the operator's settings say.
    assert ports == {"health": config["liveness_port"], "metrics": config["metrics_port"]}
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config["metrics_port"])
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])


def test_operator_config_loads_into_operator_settings(helm, default_objects, tmp_path, monkeypatch):
    settings = load_operator_settings(tmp_path, monkeypatch, default_objects)
    assert settings.runner.image == "ghcr.io/ifw/ifw-runner:0.1.0"
    assert settings.runner.resources["limits"]["nvidia.com/gpu"] == "1"
    assert settings.runner.tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert settings.runner.model_cache.volume is None  # emptyDir
    assert settings.runner.env["IFW_FETCH_ALLOWLIST"] == '["ifw-gateway.ifw-system.svc"]'
    assert settings.webhook.signing_secret is None
    assert settings.max_active_jobs == 8 and settings.namespaces == []
    # Every key the chart writes is a field the operator knows (extra="forbid" would refuse it).
    assert set(operator_yaml(default_objects)) <= set(OperatorSettings.model_fields)


def test_gpu_values_reach_operator_settings_and_the_runner_job(gpu_objects, tmp_path, monkeypatch):
    settings = load_operator_settings(tmp_path, monkeypatch, gpu_objects)
    runner = settings.runner
    assert runner.image == "registry.example.com/ifw/ifw-runner@sha256:" + "0123456789abcdef" * 4
    assert runner.resources == {"requests": {"cpu": "8", "memory": "32Gi"},
                                "limits": {"memory": "64Gi", "nvidia.com/gpu": "1"}}
    assert runner.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in runner.tolerations
    assert runner.runtime_class_name == "nvidia" and runner.priority_class_name == "ifw-batch"
    assert runner.model_cache.volume == {"hostPath": {"path": "/var/cache/huggingface", "type": "Directory"}}
    assert runner.model_cache.hub_offline is True
    assert runner.hf_token_secret.name == "hf-token" and runner.hf_token_secret.optional is False
    assert runner.s3_credentials_secret == "ifw-s3" and runner.env["IFW_RESULT_STORE"] == "s3"
    assert runner.image_pull_secrets == ["registry-example"]
    assert settings.webhook.signing_secret.get_secret_value() == "whsec_dGVzdA=="
    assert settings.webhook.max_attempts == 8 and settings.max_active_jobs == 32

    # The operator's own Job builder turns these settings into a GPU Job.
    job = runner_job(GPU_TJ, settings)
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["runtimeClassName"] == "nvidia" and pod["priorityClassName"] == "ifw-batch"
    assert {v["name"]: v for v in pod["volumes"]}["model-cache"]["hostPath"]["path"] == "/var/cache/huggingface"
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_HOME"]["value"] == "/models" and env["HF_HUB_OFFLINE"]["value"] == "1"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token", "optional": False}
    assert c["envFrom"] == [{"secretRef": {"name": "ifw-s3"}}]
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"] is True


GPU_TJ = {"apiVersion": "ifw.dev/v1alpha1", "kind": "TranscriptionJob",
          "metadata": {"name": "meeting", "namespace": "team-a", "uid": "0b5e7c1e-1111-2222-3333-444455556666"},
          "spec": {"audio": {"url": "https://media.example.com/a.mp3"}, "queueName": "gpu-h100"}}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_runner_job_built_from_the_chart_values_validates(gpu_objects, tmp_path, monkeypatch, version):
    settings = load_operator_settings(tmp_path, monkeypatch, gpu_objects)
    kubernetes_validate.validate(runner_job(GPU_TJ, settings), version, strict=True)


def test_cpu_runner_and_pvc_cache(helm, tmp_path, monkeypatch):
    objects = helm.template("--set", "runner.gpu.count=0", "--set", "runner.modelCache.type=persistentVolumeClaim",
                            "--set", "runner.modelCache.claimName=whisper-models", "--set", "runner.tolerations=null")
    settings = load_operator_settings(tmp_path, monkeypatch, objects)
    assert "nvidia.com/gpu" not in settings.runner.resources["limits"]
    assert settings.runner.model_cache.volume == {"persistentVolumeClaim": {"claimName": "whisper-models",
                                                                          "readOnly": True}}
    proc = helm.run("template", "x", str(CHART), "--set", "runner.modelCache.type=persistentVolumeClaim", check=False)
    assert proc.returncode != 0 and "runner.modelCache.claimName is required" in proc.stderr


def test_extra_config_is_merged_and_unknown_keys_are_refused_by_the_operator(helm, tmp_path, monkeypatch):
    objects = helm.template("--set", "operator.extraConfig.event_component=ifw-prod",
                            "--set", "operator.extraConfig.runner.work_dir=/tmp/work")
    settings = load_operator_settings(tmp_path, monkeypatch, objects)
    assert settings.event_component == "ifw-prod" and settings.runner.work_dir == "/tmp/work"
    assert settings.runner.image == "ghcr.io/ifw/ifw-runner:0.1.0"  # the merge kept its siblings
    objects = helm.template("--set", "operator.extraConfig.max_active_job=3")  # a typo
    with pytest.raises(Exception, match="max_active_job"):
        load_operator_settings(tmp_path, monkeypatch, objects)


# ---------------------------------------------------------------------------------- RBAC


def test_chart_operator_rules_are_generated_from_the_operator():
    """Like the CRD: the chart carries a generated copy (Helm cannot read files outside the chart)."""
    generated = subprocess.run([sys.executable, "-m", "ifw.operator.rbac"], capture_output=True, text=True,
                               check=True, cwd=ROOT).stdout
    assert (CHART / "files" / "operator-clusterrole.yaml").read_text() == generated, (
        "helm/ifw/files/operator-clusterrole.yaml is stale: "
        ".venv/bin/python -m ifw.operator.rbac > helm/ifw/files/operator-clusterrole.yaml"
    )


def test_operator_cluster_role_is_exactly_what_the_operator_declares(default_objects):
    role = one(default_objects, "ClusterRole", f"{RELEASE}-operator")
    assert role["rules"] == rbac.CLUSTER_ROLE_RULES
    binding = one(default_objects, "ClusterRoleBinding", f"{RELEASE}-operator")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": f"{RELEASE}-operator"}
    account = one(default_objects, "Deployment", f"{RELEASE}-operator")["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NS}]
    one(default_objects, "ServiceAccount", account)


def test_watch_namespaces_get_roles_not_a_cluster_wide_grant(helm, tmp_path, monkeypatch):
    objects = helm.template("--set-json", 'operator.watchNamespaces=["team-a","team-b"]')
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in by_kind(objects, "Role")}
    cluster = one(objects, "ClusterRole", f"{RELEASE}-operator")["rules"]
    for ns in ("team-a", "team-b"):
        namespaced = roles[(ns, f"{RELEASE}-operator")]["rules"]
        # Split, not changed: the union in the operator's order is its declared rules.
        assert [r for r in rbac.CLUSTER_ROLE_RULES if r in namespaced + cluster] == rbac.CLUSTER_ROLE_RULES
        assert len(namespaced) + len(cluster) == len(rbac.CLUSTER_ROLE_RULES)
        bindings = [b for b in by_kind(objects, "RoleBinding") if b["metadata"]["namespace"] == ns
                    and b["metadata"]["name"] == f"{RELEASE}-operator"]
        assert bindings and bindings[0]["roleRef"]["kind"] == "Role"
    assert {r["resources"][0] for r in cluster} == {"customresourcedefinitions", "namespaces"}
    assert load_operator_settings(tmp_path, monkeypatch, objects).namespaces == ["team-a", "team-b"]
    # The hook is limited the same way.
    hook_roles = [r for r in by_kind(objects, "Role") if r["metadata"]["name"] == f"{RELEASE}-cleanup"]
    assert sorted(r["metadata"]["namespace"] for r in hook_roles) == ["team-a", "team-b"]


def test_gateway_role_is_least_privilege_in_each_namespace_it_serves(helm):
    objects = helm.template("--set", "gateway.namespace=transcripts",
                            "--set-json", 'gateway.auth.tenantKeys={"team-a":"k1"}')
    roles = [r for r in by_kind(objects, "Role") if r["metadata"]["name"] == f"{RELEASE}-gateway"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "transcripts"]
    for role in roles:
        rules = role["rules"]
        assert allows(rules, "create", "ifw.dev", "transcriptionjobs")
        assert allows(rules, "watch", "ifw.dev", "transcriptionjobs")
        assert allows(rules, "delete", "ifw.dev", "transcriptionjobs", "x")
        assert allows(rules, "get", "", "secrets", "x-result")  # results
        assert allows(rules, "patch", "", "secrets", "x-webhook")  # owner reference on header Secrets
        assert not allows(rules, "patch", "ifw.dev", "transcriptionjobs/status", "x")
        assert not allows(rules, "list", "", "secrets")  # never enumerate Secrets
        assert not allows(rules, "create", "batch", "jobs")
    assert not [r for r in by_kind(objects, "ClusterRole") if "gateway" in r["metadata"]["name"]]


def test_rbac_and_service_accounts_can_be_turned_off(helm):
    objects = helm.template("--set", "rbac.create=false", "--set", "serviceAccount.create=false",
                            "--set", "serviceAccount.operatorName=platform-ifw")
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"}
    for kind, name in (("Deployment", f"{RELEASE}-operator"), ("Job", f"{RELEASE}-cleanup")):
        assert one(objects, kind, name)["spec"]["template"]["spec"]["serviceAccountName"] == "platform-ifw"


# ---------------------------------------------------------------------------------- gateway


def test_gateway_env_is_gateway_settings(helm, monkeypatch):
    objects = helm.template("--set", "gateway.auth.adminKey=s3cret", "--set", "gateway.queueName=gpu",
                            "--set", "gateway.ttlSecondsAfterFinished=0")
    c = container(objects, "Deployment", f"{RELEASE}-gateway")
    assert c["command"] == ["python", "-m", "ifw.gateway"]
    assert c["image"] == container(objects, "Deployment", f"{RELEASE}-operator")["image"]
    env = {e["name"]: e for e in c["env"]}
    # No misspelt setting slips through (GatewaySettings ignores unknown variables).
    fields = {f"IFW_GATEWAY_{name.upper()}" for name in GatewaySettings.model_fields}
    assert {n for n in env if n.startswith("IFW_GATEWAY_")} <= fields
    secret = one(objects, "Secret", f"{RELEASE}-gateway")
    ref = env["ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"]
    for key in list(os.environ):
        if key.startswith("IFW_GATEWAY_") or key == "ADMIN_KEY":
            monkeypatch.delenv(key)
    for name, e in env.items():
        monkeypatch.setenv(name, e.get("value", "from-a-secret"))
    settings = GatewaySettings()
    assert settings.namespace == NS and settings.port == 8000 and settings.queue_name == "gpu"
    assert settings.ttl_seconds_after_finished == 0
    assert settings.admin_key.get_secret_value() == "from-a-secret"
    assert settings.internal_url == f"http://{RELEASE}-gateway.{NS}.svc:8000"
    assert str(settings.upload_dir) == "/uploads"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/uploads", "/tmp"} <= mounts
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    service = one(objects, "Service", f"{RELEASE}-gateway")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    # Runners may fetch uploads from the gateway although its address is private.
    assert f"{RELEASE}-gateway.{NS}.svc" in operator_yaml(objects)["runner"]["env"]["IFW_FETCH_ALLOWLIST"]


def test_gateway_uploads_use_the_shared_claim(gpu_objects):
    uploads = {v["name"]: v for v in one(gpu_objects, "Deployment", f"{RELEASE}-gateway")
               ["spec"]["template"]["spec"]["volumes"]}["uploads"]
    assert uploads == {"name": "uploads", "persistentVolumeClaim": {"claimName": "ifw-uploads-rwx"}}


def test_no_secret_value_is_rendered_outside_secrets(helm):
    objects = helm.template("--set", "gateway.auth.adminKey=admin-VALUE-1",
                            "--set", "operator.webhook.signingSecret=whsec_c2lnbmluZ1ZBTFVF")
    for obj in objects:
        if obj["kind"] == "Secret":
            continue
        text = yaml.safe_dump(obj)
        assert "admin-VALUE-1" not in text and "c2lnbmluZ1ZBTFVF" not in text, obj["kind"]
    env = {e["name"]: e for e in container(objects, "Deployment", f"{RELEASE}-operator")["env"]}
    assert env["IFW_OPERATOR_WEBHOOK__SIGNING_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-webhook"


# ---------------------------------------------------------------------------------- result store


def env_values(c: dict) -> dict[str, str]:
    """A container's plain env (valueFrom entries are Secrets the kubelet reads at run time)."""
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def result_settings(env: dict[str, str], monkeypatch) -> ResultSettings:
    """ResultSettings as a process whose environment is exactly ``env`` (as to IFW_*) reads them."""
    with monkeypatch.context() as m:
        for key in list(os.environ):
            if key.upper().startswith("IFW_"):
                m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        return ResultSettings()


def result_store_of_each_component(objects, tmp_path, monkeypatch) -> dict[str, dict]:
    """The containers that touch results: the operator's and the gateway's as rendered, and the
    runner's as the operator builds it from the settings the chart's ConfigMap gives it."""
    settings = load_operator_settings(tmp_path, monkeypatch, objects)
    return {
        "operator": container(objects, "Deployment", f"{RELEASE}-operator"),
        "gateway": container(objects, "Deployment", f"{RELEASE}-gateway"),
        "runner": runner_job(GPU_TJ, settings)["spec"]["template"]["spec"]["containers"][0],
    }


RESULT_ENV = re.compile(r"IFW_(RESULT|S3)_", re.IGNORECASE)  # what ResultSettings reads


def result_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if RESULT_ENV.match(k)}


@pytest.mark.parametrize(
    "values, secret, expected",
    [
        (MINIO, "minio-creds",
         {"result_store": "s3", "result_secret_max_bytes": 900 * 1024, "s3_bucket": "transcripts",
          "s3_endpoint_url": "http://minio.storage.svc:9000", "s3_prefix": "ifw/", "s3_region": "eu-central-1"}),
        # No prefix given: the chart's default is the product's.
        (GPU, "ifw-s3",
         {"result_store": "s3", "result_secret_max_bytes": 900 * 1024, "s3_bucket": "ifw-results",
          "s3_endpoint_url": "https://s3.eu-west-1.amazonaws.com", "s3_prefix": "results/", "s3_region": "eu-west-1"}),
    ],
    ids=["minio", "gpu-production"],
)
def test_every_component_gets_the_same_s3_result_store(helm, tmp_path, monkeypatch, values, secret, expected):
    objects = helm.template(*values)
    components = result_store_of_each_component(objects, tmp_path, monkeypatch)
    envs = {name: env_values(c) for name, c in components.items()}
    result_envs = {name: result_env(env) for name, env in envs.items()}
    assert result_envs["operator"]["IFW_RESULT_STORE"] == "s3"
    assert result_envs["operator"] == result_envs["gateway"] == result_envs["runner"], result_envs
    for name, env in envs.items():
        # Read the way each component reads them: its whole environment into ResultSettings.
        assert result_settings(env, monkeypatch).model_dump() == expected, name
        # The same credentials: the Secret's keys become every one's env.
        assert components[name]["envFrom"] == [{"secretRef": {"name": secret}}], name
    assert load_operator_settings(tmp_path, monkeypatch, objects).runner.s3_credentials_secret == secret
    # runner.env keeps the runner's own settings, and they stay the runner's.
    if values is GPU:
        assert envs["runner"]["IFW_DIARIZATION_PIPELINE"] == "pyannote/speaker-diarization-3.1"
        assert "IFW_DIARIZATION_PIPELINE" not in envs["gateway"] and "IFW_DIARIZATION_PIPELINE" not in envs["operator"]


@pytest.mark.parametrize(
    "values, expected_env, max_bytes",
    [
        ((), {"IFW_RESULT_STORE": "secret"}, 900 * 1024),
        # S3 values kept around while the store is secret reach no component.
        (("--set", "results.secretMaxBytes=2097152", "--set", "results.s3.bucket=idle",
          "--set", "results.s3.credentialsSecret=idle-creds"),
         {"IFW_RESULT_STORE": "secret", "IFW_RESULT_SECRET_MAX_BYTES": "2097152"}, 2097152),
    ],
    ids=["default", "secret-with-idle-s3-values"],
)
def test_secret_store_gives_no_component_s3_settings(helm, tmp_path, monkeypatch, values, expected_env, max_bytes):
    objects = helm.template(*values)
    components = result_store_of_each_component(objects, tmp_path, monkeypatch)
    for name, c in components.items():
        env = env_values(c)
        assert result_env(env) == expected_env, name
        assert "envFrom" not in c, name
        settings = result_settings(env, monkeypatch)
        assert (settings.result_store, settings.s3_bucket, settings.result_secret_max_bytes) == (
            "secret", None, max_bytes), name
    assert load_operator_settings(tmp_path, monkeypatch, objects).runner.s3_credentials_secret is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "runner.env.IFW_S3_BUCKET=other"], "runner.env sets IFW_S3_BUCKET"),
        (["--set", "runner.env.IFW_RESULT_STORE=s3"], "runner.env sets IFW_RESULT_STORE"),
        (["--set-json", 'operator.extraEnv=[{"name":"IFW_S3_REGION","value":"x"}]'], "operator.extraEnv sets IFW_S3_REGION"),
        # ResultSettings reads env names case-insensitively.
        (["--set-json", 'gateway.extraEnv=[{"name":"ifw_result_store","value":"s3"}]'],
         "gateway.extraEnv sets ifw_result_store"),
        (["--set", "operator.extraConfig.runner.env.IFW_S3_PREFIX=x/"], "operator.extraConfig.runner.env sets IFW_S3_PREFIX"),
        (["--set", "operator.extraConfig.runner.s3_credentials_secret=x"], "use results.s3.credentialsSecret"),
    ],
)
def test_result_store_env_outside_results_is_refused(helm, args, message):
    proc = helm.run("template", "x", str(CHART), "--set", "results.store=s3", "--set", "results.s3.bucket=b",
                    *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "results.s3" in proc.stderr  # the message names where the setting belongs


def test_s3_store_needs_a_bucket_with_or_without_the_schema(helm):
    proc = helm.run("template", "x", str(CHART), "--set", "results.store=s3", check=False)
    assert proc.returncode != 0 and "results.s3.bucket: String length must be greater" in proc.stderr, proc.stderr
    proc = helm.run("template", "x", str(CHART), "--set", "results.store=s3", "--skip-schema-validation", check=False)
    assert proc.returncode != 0 and "results.s3.bucket is required when results.store is s3" in proc.stderr


# ---------------------------------------------------------------------------------- hooks, policies


def test_pre_delete_hook_runs_the_cleanup_with_the_operator_image(default_objects, gpu_objects):
    for objects, verbs in ((default_objects, ["get", "list", "patch"]), (gpu_objects, ["get", "list", "patch", "delete"])):
        hooked = [o for o in objects if (o["metadata"].get("annotations") or {}).get("helm.sh/hook")]
        assert {o["kind"] for o in hooked} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Job"}
        for o in hooked:
            annotations = o["metadata"]["annotations"]
            assert annotations["helm.sh/hook"] == "pre-delete"
            assert "hook-succeeded" in annotations["helm.sh/hook-delete-policy"]
            # Account and RBAC before the Job.
            assert int(annotations["helm.sh/hook-weight"]) < 0 or o["kind"] == "Job"
        job = one(hooked, "Job", f"{RELEASE}-cleanup")
        spec = job["spec"]["template"]["spec"]
        c = spec["containers"][0]
        assert c["image"] == container(objects, "Deployment", f"{RELEASE}-operator")["image"]
        assert c["command"][:2] == ["python", "-c"]
        assert c["command"][2] == (CHART / "files" / "cleanup.py").read_text()
        assert spec["serviceAccountName"] == f"{RELEASE}-cleanup" and spec["restartPolicy"] == "Never"
        assert job["spec"]["activeDeadlineSeconds"] > 0  # a stuck hook cannot hang the uninstall forever
        assert one(hooked, "ClusterRole", f"{RELEASE}-cleanup")["rules"] == [
            {"apiGroups": ["ifw.dev"], "resources": ["transcriptionjobs"], "verbs": verbs}]


def test_network_policies_off_by_default_and_sane_when_on(default_objects, gpu_objects, helm):
    assert not by_kind(default_objects, "NetworkPolicy")
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(gpu_objects, "NetworkPolicy")}
    assert set(policies) == {f"{RELEASE}-operator", f"{RELEASE}-gateway", f"{RELEASE}-runner"}
    gateway = policies[f"{RELEASE}-gateway"]
    peers = gateway["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}} in peers
    # Runners (in any namespace) can still fetch uploads.
    assert any(p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "runner"
               for p in peers)
    runner = policies[f"{RELEASE}-runner"]
    assert runner["policyTypes"] == ["Egress"]
    public = runner["egress"][-1]["to"][0]["ipBlock"]
    assert public["cidr"] == "0.0.0.0/0" and "169.254.0.0/16" in public["except"] and "10.0.0.0/8" in public["except"]
    proc = helm.run("template", "x", str(CHART), "--set", "networkPolicy.runnerEgress.enabled=true", check=False)
    assert proc.returncode != 0 and "apiServerCIDRs is required" in proc.stderr


# ---------------------------------------------------------------------------------- values.schema.json


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "gateway.replicaCount=two"], "gateway.replicaCount: Invalid type. Expected: integer"),
        (["--set", "operator.replicaCount=2"], "Additional property replicaCount is not allowed"),
        (["--set", "gatewy.enabled=true"], "Additional property gatewy is not allowed"),
        (["--set", "image.repository="], "image.repository: String length must be greater than or equal to 1"),
        (["--set", "image.pullPolicy=Sometimes"], "image.pullPolicy must be one of the following"),
        (["--set", "runner.modelCache.type=nfs"], "runner.modelCache.type must be one of the following"),
        (["--set", "operator.logFormat=xml"], "operator.logFormat must be one of the following"),
        (["--set", "runner.gpu.count=-1"], "runner.gpu.count: Must be greater than or equal to 0"),
        (["--set", "runner.env.IFW_CPU_THREADS=4"], "runner.env.IFW_CPU_THREADS: Invalid type. Expected: string"),
        (["--set", "operator.webhook.signingSecret=hunter2"], "operator.webhook.signingSecret: Does not match pattern"),
        (["--set", "runner.image.digest=latest"], "runner.image.digest: Does not match pattern"),
        (["--set", "operator.maxActiveJobs=0"], "operator.maxActiveJobs: Must be greater than or equal to 1"),
        (["--set-json", 'operator.watchNamespaces=["Team_A"]'], "operator.watchNamespaces.0: Does not match pattern"),
        (["--set", "results.store=gcs"], "results.store must be one of the following"),
        (["--set", "results.s3.bucket=s3://ifw-results"], "results.s3.bucket: Does not match pattern"),
        (["--set", "results.s3.endpointUrl=minio:9000"], "results.s3.endpointUrl: Does not match pattern"),
        (["--set", "results.secretMaxBytes=0"], "results.secretMaxBytes: Must be greater than or equal to 1"),
        (["--set", "runner.s3CredentialsSecret=ifw-s3"], "Additional property s3CredentialsSecret is not allowed"),
    ],
)
def test_values_schema_rejects_bad_values(helm, args, message):
    proc = helm.run("template", "x", str(CHART), *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_values_schema_requires_the_image_fields(helm, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"runner": {"image": {"repository": None}}}))  # null removes the key
    proc = helm.run("template", "x", str(CHART), "-f", str(values), check=False)
    assert proc.returncode != 0 and "repository is required" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------- one source for gateway and runner


def gateway_settings(objects, monkeypatch) -> GatewaySettings:
    """GatewaySettings as the gateway pod reads them: exactly its rendered env (Secrets as placeholders)."""
    env = {e["name"]: e.get("value", "from-a-secret") for e in container(objects, "Deployment", f"{RELEASE}-gateway")["env"]}
    with monkeypatch.context() as m:
        for key in list(os.environ):
            if key.upper().startswith("IFW_GATEWAY_") or key.upper() in ("ADMIN_KEY", "HF_TOKEN"):
                m.delenv(key)
        for name, value in env.items():
            m.setenv(name, value)
        return GatewaySettings()


def runner_settings(objects, tmp_path, monkeypatch):
    """The runner's settings as its pod reads them: the env of the Job the operator builds."""
    from ifw.runner.config import RunnerSettings

    job = runner_job(GPU_TJ, load_operator_settings(tmp_path, monkeypatch, objects))
    c = job["spec"]["template"]["spec"]["containers"][0]
    with monkeypatch.context() as m:
        for key in list(os.environ):
            if key.upper().startswith("IFW_") or key.upper() == "HF_TOKEN":
                m.delenv(key)
        for e in c["env"]:
            m.setenv(e["name"], e.get("value", "from-a-secret"))
        return RunnerSettings(), {e["name"]: e for e in c["env"]}


@pytest.mark.parametrize(
    "args, pipeline, token",
    [
        ((), None, None),
        (("--set", "diarization.enabled=true", "--set", "diarization.hfTokenSecret.name=hf"),
         "pyannote/speaker-diarization-3.1", {"name": "hf", "key": "token", "optional": False}),
        (("--set", "diarization.enabled=true", "--set", "diarization.pipeline=packaged"), "packaged", None),
        # A token Secret while diarization is off: nobody needs it, nobody gets it.
        (("--set", "diarization.hfTokenSecret.name=hf",), None, None),
        (GPU, "pyannote/speaker-diarization-3.1", {"name": "hf-token", "key": "token", "optional": False}),
    ],
    ids=["off", "hub-with-token", "packaged", "token-but-off", "gpu-production"],
)
def test_one_diarization_switch_makes_gateway_and_runner_agree(helm, tmp_path, monkeypatch, args, pipeline, token):
    objects = helm.template(*args)
    gateway = gateway_settings(objects, monkeypatch)
    runner, env = runner_settings(objects, tmp_path, monkeypatch)
    # The gateway offers diarise_audio exactly when the runner has a pipeline to run it with.
    assert gateway.diarization_available is (runner.diarization_pipeline is not None)
    assert runner.diarization_pipeline == pipeline
    assert env.get("HF_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef") == token
    for name in ("IFW_DIARIZATION_PIPELINE", "HF_TOKEN"):  # the runner's only
        assert name not in {e["name"] for e in container(objects, "Deployment", f"{RELEASE}-gateway")["env"]}


@pytest.mark.parametrize("args", [(), ("--set-json", 'operator.allowedModels=["openai/whisper-large-v3-turbo","base"]'), GPU],
                         ids=["default", "allowed", "gpu-production"])
def test_gateway_offers_the_models_the_runner_allows(helm, tmp_path, monkeypatch, args):
    objects = helm.template(*args)
    gateway = gateway_settings(objects, monkeypatch)
    runner, _ = runner_settings(objects, tmp_path, monkeypatch)
    assert gateway.allowed_models == [runner.default_model, *runner.allowed_models]


def test_gateway_waits_without_a_cap_and_keeps_the_connection_alive(helm, monkeypatch):
    settings = gateway_settings(helm.template(), monkeypatch)
    assert settings.sync_timeout_seconds is None and settings.keepalive_seconds == 30
    capped = gateway_settings(helm.template("--set", "gateway.syncTimeoutSeconds=7200",
                                            "--set", "gateway.keepaliveSeconds=0"), monkeypatch)
    assert capped.sync_timeout_seconds == 7200 and capped.keepalive_seconds == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "runner.env.IFW_DIARIZATION_PIPELINE=packaged"], "runner.env sets IFW_DIARIZATION_PIPELINE"),
        (["--set", "runner.env.ifw_allowed_models=[]"], "runner.env sets ifw_allowed_models"),
        (["--set", "operator.extraConfig.runner.env.HF_TOKEN=x"], "operator.extraConfig.runner.env sets HF_TOKEN"),
        (["--set-json", 'gateway.extraEnv=[{"name":"IFW_GATEWAY_DIARIZATION_AVAILABLE","value":"true"}]'],
         "gateway.extraEnv sets IFW_GATEWAY_DIARIZATION_AVAILABLE"),
        (["--set-json", 'gateway.extraEnv=[{"name":"HF_TOKEN","value":"x"}]'], "gateway.extraEnv sets HF_TOKEN"),
        (["--set", "operator.extraConfig.runner.hf_token_secret.name=x"], "use diarization.hfTokenSecret"),
        (["--set", "operator.extraConfig.default_model=base"], "use operator.defaultModel"),
        (["--set", "gateway.defaultModel=base"], "gateway.defaultModel base is neither"),
        # The values this section replaced are refused by the schema, so an old values file says so.
        (["--set", "runner.hfToken.secretName=hf"], "Additional property hfToken is not allowed"),
        (["--set", "gateway.diarizationAvailable=true"], "Additional property diarizationAvailable is not allowed"),
    ],
)
def test_diarization_and_models_set_elsewhere_are_refused(helm, args, message):
    proc = helm.run("template", "x", str(CHART), *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_gateway_default_model_may_be_an_allowed_one(helm, monkeypatch):
    objects = helm.template("--set-json", 'operator.allowedModels=["base"]', "--set", "gateway.defaultModel=base")
    assert gateway_settings(objects, monkeypatch).default_model == "base"


@pytest.mark.parametrize("values", [("--set", "gateway.auth.adminKey=k"), ()], ids=["with-key", "open"])
def test_notes_curl_examples_are_requests_the_gateway_accepts(helm, tmp_path, values):
    """NOTES.txt is not rendered by `helm template`: render a copy of the chart where it is a template."""
    import shutil

    from ifw.gateway.models import TranscribeRequest

    chart = tmp_path / "ifw"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "NOTES.txt").rename(chart / "templates" / "notes.txt")
    notes = helm.run("template", RELEASE, str(chart), "--show-only", "templates/notes.txt", "--debug", *values,
                     check=False).stdout  # --debug: print it although it is no YAML
    bodies = [json.loads(m) for m in re.findall(r"-d '(\{.*?\})'", notes, re.S)]
    assert len(bodies) == 2
    for body in bodies:
        request = TranscribeRequest.model_validate(body)
        # The gateway answers an async request without a webhook with 400: the examples have one.
        assert not request.is_async or request.webhook is not None
    assert any(b.get("is_async") for b in bodies)


def test_gitops_markers_reach_the_operator(helm, tmp_path, monkeypatch):
    default = load_operator_settings(tmp_path, monkeypatch, helm.template())
    assert default.gitops == OperatorSettings().gitops  # the chart's defaults are the operator's
    objects = helm.template("--set-json", 'operator.gitops.labels=["gitops.example.com/app"]',
                            "--set-json", "operator.gitops.annotations=[]")
    settings = load_operator_settings(tmp_path, monkeypatch, objects)
    assert (settings.gitops.labels, settings.gitops.annotations) == (["gitops.example.com/app"], [])
