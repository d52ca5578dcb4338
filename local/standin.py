"""Not a kubelet: a stand-in for the kubelet and the Job controller, on one machine, without containers.

The local control plane (ifw.local.control_plane) has no controllers, so nothing
would ever run a batch/v1 Job. ``KubeletStandIn`` plays both parts for the local
stack and the end-to-end tests: for each Job it creates a Pod, runs the Pod's
container command as a plain process on this machine (with the container's env,
``python`` meaning this interpreter), and writes Pod and Job status the way the
kubelet and the Job controller would (exit codes, termination messages,
podFailurePolicy, backoffLimit, activeDeadlineSeconds, suspend, deletion).

Identity: with ``credentials`` (a callable namespace, account -> kubeconfig path,
e.g. ``ControlPlane.service_account_kubeconfig``) each process acts as its Pod's
``serviceAccountName`` (``default`` when unset), as a real kubelet's mounted token
would make it; without, as the stand-in itself (its own kubeconfig).

What it is not: no images, no isolation, no resource limits, no scheduling. A pod
whose process died with the machine (a restart with `ifw local --state-dir`) is
failed when the stand-in starts again, and the Job goes on as after any failed pod.
On a real cluster none of this module runs.

    ifw standin --kubeconfig KUBECONFIG
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ifw.core import kube
from ifw.core.contract import format_time, now_string
from ifw.local.control_plane import die_with_parent

log = logging.getLogger("ifw.local.standin")


@dataclass
class _Run:
    """One Job as the stand-in tracks it."""

    namespace: str
    name: str
    uid: str
    process: subprocess.Popen | None = None
    pod_name: str | None = None
    message_path: Path | None = None
    started: float = 0.0
    failed: int = 0
    done: bool = False
    log_file: object | None = None
    extra: dict = field(default_factory=dict)
    slots: dict[int, _Slot] = field(default_factory=dict)  # an Indexed Job's indexes


@dataclass
class _Slot:
    """One index of an Indexed Job: its current pod and process, and how its tries went."""

    index: int
    process: subprocess.Popen | None = None
    pod_name: str | None = None
    message_path: Path | None = None
    log_file: object | None = None
    failed: int = 0
    done: bool = False  # succeeded
    given_up: bool = False  # failed more often than backoffLimitPerIndex allows


class KubeletStandIn:
    """Runs the runner Jobs of a cluster as local processes (see the module docstring)."""

    def __init__(self, kubeconfig: str | None = None, interval: float = 0.3, log_dir: Path | None = None,
                 credentials: Callable[[str, str], str] | None = None):
        self.kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube/config")
        # namespace, ServiceAccount -> the kubeconfig a pod of that account gets; None: our own.
        self.credentials = credentials
        self.api = kube.api_client(kubeconfig=self.kubeconfig, component="standin")
        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.interval = interval
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="ifw-standin-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)  # else every pod it creates fails at its log file
        self.runs: dict[str, _Run] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "KubeletStandIn":
        self._thread = threading.Thread(target=self.run_forever, name="kubelet-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        for run in self.runs.values():
            self._kill(run)

    def __enter__(self) -> "KubeletStandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception:  # a dev tool keeps going; the log says what broke
                log.exception("kubelet stand-in: sync failed")
            self._stop.wait(self.interval)

    # ------------------------------------------------------------ the loop

    def sync_once(self) -> None:
        jobs = self.batch.list_job_for_all_namespaces().items
        seen = set()
        for job in jobs:
            uid = job.metadata.uid
            seen.add(uid)
            adopt = uid not in self.runs  # first seen: maybe a Job an earlier stand-in ran
            run = self.runs.setdefault(uid, _Run(job.metadata.namespace, job.metadata.name, uid))
            if job.metadata.deletion_timestamp or self._finished(job):
                continue  # a Job finished before this stand-in started needs nothing either
            try:
                if adopt:
                    self._adopt(job, run)
                if not run.done:
                    self._sync_job(job, run)
            except ApiException as error:  # e.g. its namespace is gone: one Job must not stall the rest
                log.warning("cannot sync Job %s/%s: %s", run.namespace, run.name, error.reason)
        for uid in list(self.runs):
            if uid not in seen:  # the Job was deleted: stop its process like the kubelet would
                self._kill(self.runs.pop(uid))

    def _adopt(self, job: client.V1Job, run: _Run) -> None:
        """A Job from before this stand-in started (`ifw local --state-dir` after a restart): the
        processes of its running pods died with the machine. Fail those pods as a kubelet reports
        the pods of a node that went away, so the Job goes on to its next pod within backoffLimit."""
        run.failed = (job.status.failed if job.status else None) or 0
        lost = 0
        pods = self.core.list_namespaced_pod(run.namespace, label_selector=f"job-name={job.metadata.name}").items
        for pod in pods:
            owners = {ref.uid for ref in pod.metadata.owner_references or []}
            if run.uid in owners and pod.status and pod.status.phase in ("Pending", "Running"):
                self._set_pod_phase(run, "Failed", exit_code=137, reason="Error",
                                    message="the machine restarted while the pod ran", pod_name=pod.metadata.name)
                lost += 1
        if lost:
            log.info("Job %s/%s: %d pod(s) lost in a restart", run.namespace, run.name, lost)
            run.failed += lost
            self._retry_or_give_up(job, run)

    def _sync_job(self, job: client.V1Job, run: _Run) -> None:
        spec = job.spec
        if spec.completion_mode == "Indexed":
            self._sync_indexed(job, run)
            return
        if spec.suspend:
            if run.process:
                self._kill(run)
                self._set_pod_phase(run, "Failed", exit_code=143, reason="Error", message="job suspended")
                run.process = None
            conditions = (job.status.conditions if job.status else None) or []
            if not any(c.type == "Suspended" and c.status == "True" for c in conditions):
                self._patch_job_status(job, {"active": 0, "conditions": [self._condition("Suspended", "JobSuspended")]})
            return
        if run.process is None:
            self._start_pod(job, run)
            return
        deadline = spec.active_deadline_seconds
        if deadline and time.monotonic() - run.started > deadline:
            self._kill(run)
            self._set_pod_phase(run, "Failed", exit_code=137, reason="DeadlineExceeded", message="")
            self._finish(job, run, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
            return
        code = run.process.poll()
        if code is None:
            return
        if code < 0:  # killed by a signal: report it as a container runtime does, 128 + signal
            code = 128 - code
        message = run.message_path.read_text().strip() if run.message_path and run.message_path.exists() else ""
        if run.log_file:
            run.log_file.close()
        run.process = None
        if code == 0:
            self._set_pod_phase(run, "Succeeded", exit_code=0, reason="Completed", message=message)
            self._finish(job, run, "Complete", None, None)
            return
        self._set_pod_phase(run, "Failed", exit_code=code, reason="Error", message=message)
        run.failed += 1
        if self._fails_job_at_once(spec, code):
            self._finish(job, run, "Failed", "PodFailurePolicy",
                         f"Container runner for pod {run.pod_name} failed with exit code {code} matching FailJob rule")
        else:
            self._retry_or_give_up(job, run)

    def _retry_or_give_up(self, job: client.V1Job, run: _Run) -> None:
        """After a failed pod, as the Job controller: another pod, or BackoffLimitExceeded."""
        if run.failed > (job.spec.backoff_limit if job.spec.backoff_limit is not None else 6):
            self._finish(job, run, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        else:
            self._patch_job_status(job, {"failed": run.failed, "active": 0})

    @staticmethod
    def _finished(job: client.V1Job) -> bool:
        conditions = (job.status.conditions if job.status else None) or []
        return any(c.type in ("Complete", "Failed") and c.status == "True" for c in conditions)

    @staticmethod
    def _fails_job_at_once(spec: client.V1JobSpec, code: int) -> bool:
        policy = spec.pod_failure_policy
        for rule in (policy.rules if policy else None) or []:
            exit_codes = rule.on_exit_codes
            if rule.action == "FailJob" and exit_codes and exit_codes.operator == "In" and code in exit_codes.values:
                return True
        return False

    # ------------------------------------------------------------ Indexed Jobs

    def _sync_indexed(self, job: client.V1Job, run: _Run) -> None:
        """As the Job controller runs an Indexed Job: one pod per index (JOB_COMPLETION_INDEX), a failed
        index retried alone up to backoffLimitPerIndex, maxFailedIndexes and podFailurePolicy's FailJob
        failing the whole Job (its other pods stopped and deleted), completedIndexes/failedIndexes in status."""
        spec = job.spec
        count = spec.completions or 1
        per_index = spec.backoff_limit_per_index
        if not run.slots:  # first seen (maybe by an earlier stand-in): what it finished stays finished
            finished = _indexes((job.status.completed_indexes if job.status else None) or "")
            run.slots = {i: _Slot(i, done=i in finished) for i in range(count)}
        slots = [run.slots.setdefault(i, _Slot(i)) for i in range(count)]
        if spec.suspend:
            for slot in slots:
                if slot.process:
                    self._kill_slot(run, slot, phase="Failed", code=143, message="job suspended")
            conditions = (job.status.conditions if job.status else None) or []
            if not any(c.type == "Suspended" and c.status == "True" for c in conditions):
                self._patch_job_status(job, {"active": 0, "conditions": [self._condition("Suspended", "JobSuspended")]})
            return
        if run.started and spec.active_deadline_seconds and time.monotonic() - run.started > spec.active_deadline_seconds:
            self._stop_indexes(run, slots)
            self._finish(job, run, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
            return
        for slot in slots:
            if slot.process is None or slot.done or slot.given_up:
                continue
            code = slot.process.poll()
            if code is None:
                continue
            code = 128 - code if code < 0 else code  # killed by a signal: 128 + signal, as a runtime reports it
            path = slot.message_path
            message = path.read_text().strip() if path and path.exists() else ""
            if slot.log_file:
                slot.log_file.close()
            slot.process = None
            if code == 0:
                self._set_pod_phase(run, "Succeeded", exit_code=0, reason="Completed", message=message,
                                    pod_name=slot.pod_name)  # fmt: skip
                slot.done = True
                continue
            self._set_pod_phase(run, "Failed", exit_code=code, reason="Error", message=message, pod_name=slot.pod_name)
            slot.failed += 1
            run.failed += 1
            if self._fails_job_at_once(spec, code):
                self._stop_indexes(run, slots)
                self._finish(job, run, "Failed", "PodFailurePolicy", f"Container runner for pod {slot.pod_name} "
                             f"failed with exit code {code} matching FailJob rule")  # fmt: skip
                return
            if per_index is not None and slot.failed > per_index:
                slot.given_up = True
        given_up = [s.index for s in slots if s.given_up]
        if spec.max_failed_indexes is not None and len(given_up) > spec.max_failed_indexes:
            self._stop_indexes(run, slots)
            self._finish(job, run, "Failed", "MaxFailedIndexesExceeded", "Job has exceeded the specified maximal "
                         "number of failed indexes")  # fmt: skip
            return
        if per_index is None and run.failed > (spec.backoff_limit if spec.backoff_limit is not None else 6):
            self._stop_indexes(run, slots)
            self._finish(job, run, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
            return
        active = sum(1 for s in slots if s.process is not None)
        for slot in slots:  # start (or retry) the indexes with work left, up to spec.parallelism at once
            if slot.process is None and not slot.done and not slot.given_up and active < (spec.parallelism or 1):
                self._start_slot(job, run, slot)
                active += 1
        if all(s.done for s in slots):
            self._finish(job, run, "Complete", None, None, succeeded=count, completed=_ranges(range(count)))
            return
        if all(s.done or s.given_up for s in slots):
            self._finish(job, run, "Failed", "FailedIndexes", "Job has failed indexes")
            return
        status = {"active": active, "succeeded": sum(s.done for s in slots), "failed": run.failed,
                  "completedIndexes": _ranges(s.index for s in slots if s.done) or None,
                  "failedIndexes": _ranges(given_up) if per_index is not None else None}  # fmt: skip
        if not run.started:
            run.started = time.monotonic()
            status["startTime"] = format_time(job.status.start_time if job.status else None) or now_string()
        if status != run.extra.get("status"):  # only what changed: every write wakes the operator
            run.extra["status"] = status
            self._patch_job_status(job, status)

    def _start_slot(self, job: client.V1Job, run: _Run, slot: _Slot) -> None:
        index = str(slot.index)
        slot.pod_name, slot.message_path, slot.process, slot.log_file = self._spawn_pod(
            job, run.namespace, f"{job.metadata.name[:46]}-{index}-{uuid.uuid4().hex[:5]}",
            labels={"batch.kubernetes.io/job-completion-index": index},
            annotations={"batch.kubernetes.io/job-completion-index": index,
                         "batch.kubernetes.io/job-index-failure-count": str(slot.failed)},
            env={"JOB_COMPLETION_INDEX": index},
        )  # fmt: skip
        self._set_pod_phase(run, "Running", pod_name=slot.pod_name)

    def _kill_slot(self, run: _Run, slot: _Slot, *, phase: str, code: int, message: str) -> None:
        self._kill(slot)  # type: ignore[arg-type]  (the same process fields)
        self._set_pod_phase(run, phase, exit_code=code, reason="Error", message=message, pod_name=slot.pod_name)
        slot.process = None

    def _stop_indexes(self, run: _Run, slots: list[_Slot]) -> None:
        """The Job failed: its other pods are stopped and deleted, as the Job controller deletes them
        (they never become the failed pod whose message says why)."""
        for slot in slots:
            if slot.process is not None:
                self._kill(slot)  # type: ignore[arg-type]
                slot.process = None
                try:
                    self.core.delete_namespaced_pod(slot.pod_name, run.namespace, grace_period_seconds=0)
                except ApiException as error:
                    if error.status != 404:
                        raise

    # ------------------------------------------------------------ pods

    def _spawn_pod(self, job: client.V1Job, namespace: str, pod_name: str, *, labels: dict | None = None,
                   annotations: dict | None = None, env: dict | None = None):  # fmt: skip
        """Create the Pod and start its container's command: (name, termination path, process, log)."""
        template = job.spec.template
        container = template.spec.containers[0]
        all_labels = dict(template.metadata.labels or {}) if template.metadata else {}
        all_labels.update({"batch.kubernetes.io/job-name": job.metadata.name, "job-name": job.metadata.name,
                           **(labels or {})})  # fmt: skip
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": namespace,
                "labels": all_labels,
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job.metadata.name,
                                     "uid": job.metadata.uid, "controller": True, "blockOwnerDeletion": True}],
            },
            "spec": self.api.sanitize_for_serialization(template.spec),
        }
        if annotations:
            pod["metadata"]["annotations"] = dict(annotations)
        self.core.create_namespaced_pod(namespace, pod)
        message_path = self.log_dir / f"{pod_name}.termination"
        variables = self._container_env(namespace, pod_name, container)
        variables.update(KUBECONFIG=self._pod_kubeconfig(namespace, template.spec),
                         IFW_TERMINATION_MESSAGE_PATH=str(message_path), **(env or {}))
        command = [sys.executable if part in ("python", "python3") else part
                   for part in [*(container.command or []), *(container.args or [])]]
        log_file = open(self.log_dir / f"{pod_name}.log", "wb")
        log.info("starting %s/%s: %s", namespace, pod_name, " ".join(command))
        # The pod dies with the stand-in's thread (a SIGKILLed `ifw local` leaves no runner behind).
        process = subprocess.Popen(command, env=variables, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=die_with_parent)
        return pod_name, message_path, process, log_file

    def _start_pod(self, job: client.V1Job, run: _Run) -> None:
        run.pod_name, run.message_path, run.process, run.log_file = self._spawn_pod(
            job, run.namespace, f"{job.metadata.name[:52]}-{uuid.uuid4().hex[:5]}")
        run.started = time.monotonic()
        self._set_pod_phase(run, "Running")
        status = {"active": 1, "startTime": format_time(job.status.start_time) or now_string()}
        if any(c.type == "Suspended" and c.status == "True" for c in (job.status.conditions or [])):
            status["conditions"] = [{**self._condition("Suspended", "JobResumed"), "status": "False"}]
        self._patch_job_status(job, status)

    def _pod_kubeconfig(self, namespace: str, spec: client.V1PodSpec) -> str:
        """The pod's identity: its ServiceAccount's (as the kubelet mounts its token), else ours."""
        if self.credentials is None:
            return self.kubeconfig
        return self.credentials(namespace, spec.service_account_name or "default")

    def _container_env(self, namespace: str, pod_name: str, container: client.V1Container) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("IFW_")}
        for source in container.env_from or []:
            if source.config_map_ref:
                data = self.core.read_namespaced_config_map(source.config_map_ref.name, namespace).data or {}
                env.update({(source.prefix or "") + k: v for k, v in data.items()})
            if source.secret_ref:
                data = self.core.read_namespaced_secret(source.secret_ref.name, namespace).data or {}
                env.update({(source.prefix or "") + k: base64.b64decode(v).decode() for k, v in data.items()})
        # the downward API's fields; this machine is the one "node" there is
        fields = {"metadata.namespace": namespace, "metadata.name": pod_name, "spec.nodeName": socket.gethostname()}
        for var in container.env or []:
            if var.value_from is None:
                env[var.name] = var.value or ""  # the API drops `value: ""`; the kubelet still sets it
            elif var.value_from and var.value_from.field_ref:
                env[var.name] = fields.get(var.value_from.field_ref.field_path, "")
            elif var.value_from and var.value_from.secret_key_ref:
                ref = var.value_from.secret_key_ref
                try:
                    data = self.core.read_namespaced_secret(ref.name, namespace).data or {}
                except ApiException:
                    if ref.optional:
                        continue
                    raise
                if ref.key in data:
                    env[var.name] = base64.b64decode(data[ref.key]).decode()
            elif var.value_from and var.value_from.config_map_key_ref:
                ref = var.value_from.config_map_key_ref
                data = self.core.read_namespaced_config_map(ref.name, namespace).data or {}
                if ref.key in data:
                    env[var.name] = data[ref.key]
        return env

    def _set_pod_phase(self, run: _Run, phase: str, exit_code: int | None = None, reason: str = "",
                       message: str = "", pod_name: str | None = None) -> None:
        """The status of the run's pod (or of `pod_name`, another pod of its Job)."""
        pod_name = pod_name or run.pod_name
        if not pod_name:
            return
        if phase == "Running":
            state = {"running": {"startedAt": now_string()}}
        else:
            state = {"terminated": {"exitCode": exit_code, "reason": reason, "message": message or None,
                                    "finishedAt": now_string()}}
        status = {"phase": phase, "startTime": now_string(),
                  "containerStatuses": [{"name": "runner", "ready": phase == "Running", "restartCount": 0,
                                         "image": "local", "imageID": "", "state": state}]}
        try:
            self.core.patch_namespaced_pod_status(pod_name, run.namespace, {"status": status})
        except ApiException as error:
            if error.status != 404:
                raise

    # ------------------------------------------------------------ jobs

    @staticmethod
    def _condition(kind: str, reason: str | None, message: str | None = None) -> dict:
        return {"type": kind, "status": "True", "reason": reason, "message": message,
                "lastProbeTime": now_string(), "lastTransitionTime": now_string()}

    def _finish(self, job: client.V1Job, run: _Run, kind: str, reason: str | None, message: str | None,
                succeeded: int = 1, completed: str | None = None) -> None:  # fmt: skip
        run.done = True
        if kind == "Complete":
            conditions = [self._condition("SuccessCriteriaMet", "CompletionsReached"),
                          self._condition("Complete", "CompletionsReached")]
            patch = {"succeeded": succeeded, "active": 0, "completionTime": now_string(), "conditions": conditions}
            if completed:
                patch["completedIndexes"] = completed
        else:
            conditions = [self._condition("FailureTarget", reason, message), self._condition("Failed", reason, message)]
            patch = {"failed": max(run.failed, 1), "active": 0, "conditions": conditions}
        self._patch_job_status(job, patch)

    def _patch_job_status(self, job: client.V1Job, status: dict) -> None:
        try:
            self.batch.patch_namespaced_job_status(job.metadata.name, job.metadata.namespace, {"status": status})
        except ApiException as error:
            if error.status != 404:
                raise

    @staticmethod
    def _kill(run: _Run | _Slot) -> None:
        for slot in getattr(run, "slots", {}).values():
            KubeletStandIn._kill(slot)
        if run.process and run.process.poll() is None:
            os.killpg(run.process.pid, signal.SIGTERM)
            try:
                run.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(run.process.pid, signal.SIGKILL)
                run.process.wait()


def _ranges(indexes) -> str:
    """Indexes as the Job controller writes completedIndexes: "0-2,5"."""
    out: list[str] = []
    for i in sorted(set(indexes)):
        if out and out[-1].split("-")[-1] == str(i - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def _indexes(ranges: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, ranges.split(",")):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ifw standin", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    node = KubeletStandIn(args.kubeconfig)
    signal.signal(signal.SIGTERM, lambda *_: node._stop.set())
    try:
        node.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()


if __name__ == "__main__":
    main()
