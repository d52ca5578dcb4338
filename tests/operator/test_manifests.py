"""The runner Job, its pod template and its per-job objects, as the operator creates them."""

from __future__ import annotations

import pytest

from ifw.core import contract, results
from ifw.operator import jobs
from ifw.operator.config import OperatorSettings
from tests.operator.conftest import wait_for

GPU_CONFIG = {
    "runner": {
        "image": "registry.example.com/ifw-runner:1.2.3",
        "resources": {"requests": {"cpu": "6", "memory": "24Gi"}, "limits": {"nvidia.com/gpu": "2", "memory": "48Gi"}},
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                        {"key": "dedicated", "operator": "Equal", "value": "asr", "effect": "NoSchedule"}],
        "runtime_class_name": "nvidia",
        "priority_class_name": "asr-batch",
        "model_cache": {"volume": {"persistentVolumeClaim": {"claimName": "whisper-models", "readOnly": True}},
                        "mount_path": "/models"},
        "hf_token_secret": {"name": "hf-token", "key": "token"},
        "s3_credentials_secret": "s3-creds",
        "env": {"IFW_RESULT_STORE": "s3", "IFW_S3_BUCKET": "transcripts", "IFW_JOB_NAME": "ignored"},
        "image_pull_secrets": ["regcred"],
    },
    "default_model": "openai/whisper-large-v3-turbo",
}

TJ = {
    "apiVersion": "ifw.dev/v1alpha1",
    "kind": "TranscriptionJob",
    "metadata": {"name": "meeting", "namespace": "team-a", "uid": "0b7c1a2e-5d1f-4c39-a0a9-1f2e3d4c5b6a",
                 "generation": 1},
    "spec": {"audio": {"url": "https://example.com/a.mp3"}, "backoffLimit": 4, "activeDeadlineSeconds": 3600},
}


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_pod_template_from_config_is_a_secure_gpu_pod():
    job = jobs.runner_job(TJ, OperatorSettings(**GPU_CONFIG))
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/ifw-runner:1.2.3"
    assert container["command"] == ["python", "-m", "ifw.runner", "job"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "dedicated", "operator": "Equal", "value": "asr", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["runtimeClassName"] == "nvidia" and pod["priorityClassName"] == "asr-batch"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    # Restricted pod security: non-root, read-only root FS, no escalation, no capabilities, seccomp.
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["restartPolicy"] == "Never" and pod["enableServiceLinks"] is False
    # The runner's identity is its own per-job account.
    assert pod["serviceAccountName"] == "meeting-runner"
    # The runner contract: which job to run, the model cache, the token from a Secret.
    env = _env(container)
    assert (env["IFW_JOB_NAMESPACE"], env["IFW_JOB_NAME"], env["IFW_JOB_UID"]) == (
        "team-a", "meeting", TJ["metadata"]["uid"])
    assert env["HF_HOME"] == "/models" and env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}
    assert env["IFW_RESULT_STORE"] == "s3" and env["IFW_DEFAULT_MODEL"] == "openai/whisper-large-v3-turbo"
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert [e["name"] for e in container["env"]].count("IFW_JOB_NAME") == 1  # config cannot override it
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["model-cache"]["mountPath"] == "/models" and mounts["model-cache"]["readOnly"] is True
    assert mounts["tmp"]["mountPath"] == "/tmp"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == "whisper-models"
    # Per job: retries, deadline, fail fast on bad input, preemption is free.
    assert spec["backoffLimit"] == 4 and spec["activeDeadlineSeconds"] == 3600 and spec["suspend"] is False
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert {"action": "FailJob", "onExitCodes": {"containerName": "runner", "operator": "In", "values": [2]}} in rules
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


def test_queue_name_makes_a_suspended_kueue_job():
    tj = {**TJ, "spec": {**TJ["spec"], "queueName": "gpu-queue"}}
    job = jobs.runner_job(tj, OperatorSettings())
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True


def test_names_are_deterministic_and_valid():
    uid = TJ["metadata"]["uid"]
    assert jobs.job_name("meeting", uid) == "meeting-0b7c1a2e"
    long = "a" * 60 + "-b"
    name = jobs.job_name(long, uid)
    assert len(name) <= 63 and name == jobs.job_name(long, uid) and name.endswith("-0b7c1a2e")
    assert contract.label_value("x" * 200) == contract.label_value("x" * 200)
    assert len(contract.label_value("x" * 200)) <= 63
    assert contract.label_value("x" * 200) != contract.label_value("x" * 199 + "y")
    assert results.secret_name("meeting") == "meeting-result"
    assert len(results.secret_name("m" * 250)) <= 253


def test_children_are_owned_and_labelled():
    for obj in [*jobs.children(TJ), jobs.runner_job(TJ, OperatorSettings())]:
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "ifw.dev/v1alpha1", "kind": "TranscriptionJob", "name": "meeting",
                         "uid": TJ["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        assert obj["metadata"]["labels"][contract.LABEL_JOB_UID] == TJ["metadata"]["uid"]
        assert obj["metadata"]["namespace"] == "team-a"
    (secret,) = [obj for obj in jobs.children(TJ) if obj["kind"] == "Secret"]
    assert secret == results.result_secret(TJ)  # one builder: the store's
    assert secret["type"] == results.SECRET_TYPE and "data" not in secret
    assert secret["metadata"]["labels"][contract.LABEL_JOB_NAME] == "meeting"
    binding = jobs.runner_role_binding(TJ)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "meeting-runner", "namespace": "team-a"}]
    assert binding["roleRef"]["name"] == jobs.runner_role(TJ)["metadata"]["name"]


@pytest.mark.cluster
def test_created_job_carries_the_configured_template(run_operator, sim):
    run_operator(**GPU_CONFIG)
    tj = sim.create_tj("gpu", backoffLimit=1)
    job = sim.job_of(tj)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"key": "dedicated", "operator": "Equal", "value": "asr", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["runtimeClassName"] == "nvidia" and job["spec"]["backoffLimit"] == 1
    # The per-job RBAC and the empty result Secret exist before the Job is used.
    ns = sim.ns
    role = wait_for(lambda: sim.rbac.list_namespaced_role(ns, label_selector=f"{contract.LABEL_JOB_UID}={tj['metadata']['uid']}").items, 15)
    assert role[0].rules[1].resource_names == ["gpu"] and role[0].rules[2].resource_names == ["gpu-result"]
    secret = sim.core.read_namespaced_secret("gpu-result", ns)
    assert secret.type == "ifw.dev/result" and not secret.data
    assert sim.core.read_namespaced_service_account("gpu-runner", ns).metadata.owner_references[0].uid == tj["metadata"]["uid"]
    assert sim.status("gpu")["model"] == "openai/whisper-large-v3-turbo"
