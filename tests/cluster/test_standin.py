"""The kubelet stand-in plays kubelet and Job controller faithfully enough for end-to-end tests."""

from __future__ import annotations

import time
import uuid

import pytest
from kubernetes import client

from ifw.local.standin import KubeletStandIn

WRITE_MESSAGE_AND_EXIT = (
    "import os, sys; open(os.environ['IFW_TERMINATION_MESSAGE_PATH'], 'w').write(os.environ['MESSAGE']); "
    "sys.exit(int(os.environ['CODE']))"
)


def job_body(code: int, backoff_limit: int = 0, message: str = "") -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"j-{uuid.uuid4().hex[:6]}"},
        "spec": {
            "backoffLimit": backoff_limit,
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}]},
            "template": {"spec": {"restartPolicy": "Never", "containers": [{
                "name": "runner", "image": "local",
                "command": ["python", "-c", WRITE_MESSAGE_AND_EXIT],
                "env": [{"name": "CODE", "value": str(code)}, {"name": "MESSAGE", "value": message},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
            }]}},
        },
    }


def finished(batch: client.BatchV1Api, namespace: str, name: str, timeout: float = 60) -> client.V1Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = batch.read_namespaced_job(name, namespace)
        kinds = {c.type for c in (job.status.conditions or []) if c.status == "True"}
        if kinds & {"Complete", "Failed"}:
            return job
        time.sleep(0.2)
    raise AssertionError(f"Job {name} did not finish in {timeout}s")


@pytest.fixture
def node(kube, tmp_path):
    with KubeletStandIn(kube.kubeconfig, interval=0.1, log_dir=tmp_path) as running:
        yield running


@pytest.mark.parametrize(
    ("code", "backoff", "condition", "reason", "pods"),
    [
        (0, 0, "Complete", "CompletionsReached", 1),
        (2, 3, "Failed", "PodFailurePolicy", 1),  # bad input: no retry, whatever the backoff limit
        (1, 1, "Failed", "BackoffLimitExceeded", 2),  # transient: one retry, then give up
    ],
)
def test_exit_codes_become_job_conditions(kube, namespace, node, code, backoff, condition, reason, pods):
    with kube.api_client() as api:
        batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
        message = '{"reason": "InvalidAudio", "message": "not audio"}' if code else ""
        name = batch.create_namespaced_job(namespace, job_body(code, backoff, message)).metadata.name
        job = finished(batch, namespace, name)
        last = next(c for c in job.status.conditions if c.type == condition)
        assert last.reason == reason
        made = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        assert len(made) == pods
        for pod in made:
            assert pod.metadata.owner_references[0].uid == job.metadata.uid
            terminated = pod.status.container_statuses[0].state.terminated
            assert terminated.exit_code == code
            assert (terminated.message or "") == message
            assert pod.status.phase == ("Succeeded" if code == 0 else "Failed")


def test_deleting_the_job_stops_its_process(kube, namespace, node):
    with kube.api_client() as api:
        batch = client.BatchV1Api(api)
        body = job_body(0)
        body["spec"]["template"]["spec"]["containers"][0]["command"] = ["python", "-c", "import time; time.sleep(120)"]
        name = batch.create_namespaced_job(namespace, body).metadata.name
        deadline = time.monotonic() + 30
        while not any(r.process for r in node.runs.values() if r.name == name):
            assert time.monotonic() < deadline, "the pod's process never started"
            time.sleep(0.1)
        process = next(r.process for r in node.runs.values() if r.name == name)
        batch.delete_namespaced_job(name, namespace)
        process.wait(timeout=30)
        assert process.returncode == -15  # SIGTERM, like a kubelet stopping the container


# Lists Secrets as whoever KUBECONFIG says; writes the refusal to the termination message.
LIST_SECRETS_AND_REPORT = """
import os
from kubernetes import client, config
api = client.CoreV1Api(config.new_client_from_config(config_file=os.environ["KUBECONFIG"]))
try:
    api.list_namespaced_secret(os.environ["NS"])
except client.ApiException as error:
    open(os.environ["IFW_TERMINATION_MESSAGE_PATH"], "w").write(error.body)
"""


def test_each_pod_acts_as_its_service_account(kube, namespace, tmp_path):
    """With credentials, a pod's process gets its ServiceAccount's identity (as a kubelet mounts
    its token): the server then knows it by that account's username."""
    with KubeletStandIn(kube.kubeconfig, interval=0.1, log_dir=tmp_path,
                        credentials=kube.cp.service_account_kubeconfig) as node, kube.api_client() as api:
        batch = client.BatchV1Api(api)
        names = {}
        for account in ("worker", None):
            body = job_body(0)
            pod = body["spec"]["template"]["spec"]
            if account:
                pod["serviceAccountName"] = account
            pod["containers"][0]["command"] = ["python", "-c", LIST_SECRETS_AND_REPORT]
            pod["containers"][0]["env"] = [{"name": "NS", "value": namespace}]
            names[account or "default"] = batch.create_namespaced_job(namespace, body).metadata.name
        for account, name in names.items():
            finished(batch, namespace, name)
            run = next(r for r in node.runs.values() if r.name == name)
            # Nothing is bound to the account: the server refuses it, by its name.
            refusal = run.message_path.read_text()
            assert f'User \\"system:serviceaccount:{namespace}:{account}\\" cannot list' in refusal, refusal


# Sleeps on its first run (a marker file tells), exits 0 on the next: a pod lost mid-run, then a retry.
SLEEP_THE_FIRST_TIME = (
    "import os, time; first = not os.path.exists(os.environ['MARK']); open(os.environ['MARK'], 'w').close(); "
    "time.sleep(600 if first else 0)"
)


def test_a_pod_lost_with_the_machine_is_failed_by_the_next_stand_in_and_the_job_goes_on(kube, namespace, tmp_path):
    # `ifw local --state-dir` after a restart: the API still says Running for a pod whose process
    # is gone. The new stand-in must fail that pod (as a kubelet reports a lost node's pods) and
    # let the Job retry, not leave it Running forever or run two pods at once.
    with kube.api_client() as api:
        batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
        body = job_body(0, backoff_limit=1)
        container = body["spec"]["template"]["spec"]["containers"][0]
        container["command"] = ["python", "-c", SLEEP_THE_FIRST_TIME]
        container["env"].append({"name": "MARK", "value": str(tmp_path / "ran-once")})
        with KubeletStandIn(kube.kubeconfig, interval=0.1, log_dir=tmp_path / "before") as before:
            name = batch.create_namespaced_job(namespace, body).metadata.name
            deadline = time.monotonic() + 30
            while not (tmp_path / "ran-once").exists():
                assert time.monotonic() < deadline, "the first pod's process never started"
                time.sleep(0.1)
            lost = next(r.pod_name for r in before.runs.values() if r.name == name)
        # The machine is gone (its processes killed); the pod's status was never told.
        assert core.read_namespaced_pod(lost, namespace).status.phase == "Running"

        with KubeletStandIn(kube.kubeconfig, interval=0.1, log_dir=tmp_path / "after"):
            job = finished(batch, namespace, name)
        assert any(c.type == "Complete" and c.status == "True" for c in job.status.conditions)
        assert job.status.failed == 1 and job.status.succeeded == 1
        old = core.read_namespaced_pod(lost, namespace)
        terminated = old.status.container_statuses[0].state.terminated
        assert old.status.phase == "Failed" and terminated.exit_code == 137
        assert "restarted" in terminated.message
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        assert sorted(p.status.phase for p in pods) == ["Failed", "Succeeded"]


# Index 1 fails on its first try (transient), then succeeds: retried alone; index 2 may be told to fail with bad input.
INDEXED = (
    "import os, sys; i = os.environ['JOB_COMPLETION_INDEX']; flag = os.path.join(os.environ['FLAGS'], i); "
    "first = not os.path.exists(flag); open(flag, 'w').close(); "
    "sys.exit(2 if i == os.environ.get('BAD') else 1 if i == '1' and first else 0)"
)


def indexed_body(tmp_path, bad: str = "") -> dict:
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": f"ix-{uuid.uuid4().hex[:6]}"},
        "spec": {
            "completionMode": "Indexed", "completions": 3, "parallelism": 3, "backoffLimitPerIndex": 1,
            "maxFailedIndexes": 0,
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}]},
            "template": {"spec": {"restartPolicy": "Never", "containers": [{
                "name": "runner", "image": "local", "command": ["python", "-c", INDEXED],
                "env": [{"name": "FLAGS", "value": str(tmp_path)}, {"name": "BAD", "value": bad}],
            }]}},
        },
    }  # fmt: skip


def test_an_indexed_job_runs_each_index_and_retries_a_failed_one_alone(kube, namespace, node, tmp_path):
    with kube.api_client() as api:
        batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
        name = batch.create_namespaced_job(namespace, indexed_body(tmp_path)).metadata.name
        job = finished(batch, namespace, name)
        assert [c.reason for c in job.status.conditions if c.type == "Complete"] == ["CompletionsReached"]
        assert (job.status.succeeded, job.status.completed_indexes, job.status.failed) == (3, "0-2", 1)
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={name}").items
        by_index = sorted(p.metadata.labels["batch.kubernetes.io/job-completion-index"] for p in pods)
        assert by_index == ["0", "1", "1", "2"]  # index 1 twice: its retry, and no other index again


def test_an_indexed_job_fails_at_once_on_bad_input_and_stops_its_other_pods(kube, namespace, node, tmp_path):
    with kube.api_client() as api:
        batch = client.BatchV1Api(api)
        name = batch.create_namespaced_job(namespace, indexed_body(tmp_path, bad="2")).metadata.name
        job = finished(batch, namespace, name)
        assert [c.reason for c in job.status.conditions if c.type == "Failed"] == ["PodFailurePolicy"]
