"""Pool mode: a long-lived runner worker that holds its models and takes TranscriptionJobs.

    ifw-runner serve      # in a pool Deployment's pod (IFW_WORKER_NAME from the downward API)

A job run in its own batch/v1 Job pays a pod start, Python, torch and the model load before
its first second of audio; a pool worker pays them once. Coordination stays in Kubernetes:

- **Liveness**: the worker holds a Lease named after itself in its namespace, renewed every
  few seconds, annotated with the models it holds and how many jobs it runs at once. The
  operator assigns jobs only to workers with a fresh Lease that are not draining, and when a
  Lease goes stale (the worker died or stalled) it assigns that worker's jobs again.
- **Assignment**: the operator writes ``status.assignment {worker, attempt}`` on the
  TranscriptionJob; the worker follows the jobs with one watch and starts those assigned to it.
- **Reports**: for its attempt the worker writes ``status.execution`` (Running, then Succeeded,
  Failed or HandedBack) beside the runner's usual ``progress``, ``audio``, ``speakers`` and
  ``result`` — every write a JSON patch that first tests that the assignment is still this
  worker's attempt, so a worker that lost its job can never overwrite the next attempt's status.
- **Cancel**: the job deleted, or assigned elsewhere: its run stops at the next piece boundary.
- **Drain** (SIGTERM): the Lease says draining (no new work); running jobs get the grace
  period to finish, the rest are handed back; the Lease is deleted.
- **Batching across jobs**: each job runs in its own thread (fetch, decode, VAD, diarization
  one at a time), and hands its pieces to the model's SharedDecoder (runner/batching.py),
  whose one thread fills each generate() call with pieces of every running job
  (IFW_WORKER_BATCH_SIZE pieces, IFW_WORKER_BATCH_WAIT_SECONDS at most for company;
  IFW_WORKER_CROSS_JOB_BATCHING=false: one job's pieces per call). Metrics on the health port:
  ``ifw_worker_generate_calls_total``, ``ifw_worker_pieces_decoded_total``,
  ``ifw_worker_decode_rounds_total{jobs}``, ``ifw_worker_queued_pieces``.
- **Poison jobs**: every failure stays in its job's thread and becomes that job's report; a
  shared decode round that fails is decoded again job by job, so the error reaches only its job.

Status shapes, the result store and the failure reasons are the same as in Job mode.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ifw.core import contract, kube, results
from ifw.core.contract import ExecutionState, Reason, Runtime
from ifw.core.transcript import ProcessedBy
from ifw.core.watch import Watcher
from ifw.runner import errors, execute
from ifw.runner.audio import SAMPLE_RATE
from ifw.runner.batching import SharedDecoder
from ifw.runner.config import RunnerSettings, WorkerSettings, get_settings
from ifw.runner.execute import Cancelled, HandBack

if TYPE_CHECKING:
    import numpy as np

    from ifw.crds.transcriptionjob import TranscriptionJobSpec
    from ifw.runner.decoding import Decode

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One job this worker runs: which attempt, and how to stop it."""

    namespace: str
    name: str
    uid: str
    attempt: int
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    last_progress: float = field(default_factory=time.monotonic)
    started: str | None = None  # execution.startTime, kept when a later report replaces the entry

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name


class Worker:
    def __init__(self, settings: WorkerSettings, runner: RunnerSettings, api: Any):
        from kubernetes import client

        self.settings = settings
        self.runner = runner
        self.api = api
        self.tjs = kube.TranscriptionJobs(api)
        self.core = client.CoreV1Api(api)
        self.leases = client.CoordinationV1Api(api)
        self.models = settings.models or [runner.default_model]
        self.result_settings = results.ResultSettings()
        self.runs: dict[tuple[str, str], Run] = {}
        # uid -> the attempt this process last started, until the job ends: tells a relist's "ran
        # here" from a run that a previous process of this worker (same pod name after a container
        # restart) started and lost.
        self.started: dict[str, int] = {}
        # (namespace, name) -> the newest event of a job whose previous attempt here is still stopping:
        # the new attempt starts as soon as the old one has (no later event may come to start it).
        self.superseded: dict[tuple[str, str], dict[str, Any]] = {}
        self.draining = threading.Event()
        self.stopped = threading.Event()
        self._renew_now = threading.Event()
        # Set by SIGTERM, or by a device failure: main() then stops the worker and exits.
        self.exit_requested = threading.Event()
        self.device_failure: contract.Failure | None = None
        self._lock = threading.Lock()  # guards runs
        # One decoder thread per model: the only user of the model, batching every job's pieces.
        self.decoders: dict[str, SharedDecoder] = {}
        self._watchers: list[Watcher] = []

    # ------------------------------------------------------------------ lifecycle

    def warm_up(self) -> None:
        """Load every served model (and the diarization pipeline) before taking any work."""
        from ifw.runner import models

        s = self.settings
        for name in self.models:
            if name not in self.decoders:
                self.decoders[name] = SharedDecoder(models.load_model(name, self.runner), batch_size=s.batch_size,
                                                    max_wait_seconds=s.batch_wait_seconds,
                                                    cross_job=s.cross_job_batching)  # fmt: skip
        if self.runner.diarization_pipeline:
            from ifw.runner import diarize

            diarize.load_pipeline(self.runner)

    def start(self) -> Worker:
        self.warm_up()
        self._write_lease(create=True)
        namespaces: list[str | None] = [*self.settings.watch_namespaces] or [None]  # None: every namespace
        for namespace in namespaces:
            watcher = self.tjs.watcher(namespace, on_list=self._on_list, on_event=self._on_event,
                                       name=f"worker-watch-{namespace or 'all'}")  # fmt: skip
            self._watchers.append(watcher.start())
        threading.Thread(target=self._renew_forever, name="worker-lease", daemon=True).start()
        log.info("pool worker %s serving %s, capacity %d", self.settings.name, self.models, self.settings.capacity)
        return self

    def drain(self) -> None:
        """SIGTERM: take no more work, let running jobs finish within the grace, hand back the rest."""
        if self.draining.is_set():
            return
        self.draining.set()
        log.info("draining: %d jobs running", len(self.runs))
        self._write_lease()
        deadline = time.monotonic() + self.settings.drain_seconds
        while self.runs and time.monotonic() < deadline:
            time.sleep(0.1)
        for run in list(self.runs.values()):
            run.cancel.set()
            self._report(run, ExecutionState.HandedBack, reason=Reason.WorkerDraining,
                         message=f"pool worker {self.settings.name} shut down before the job finished")  # fmt: skip
        self.stop()

    def device_failed(self, failure: contract.Failure, culprit: Run) -> None:
        """A CUDA error broke this process's context: every later job here would fail too. Take no
        more work, give the other running jobs back (the operator assigns them to other workers),
        let the Lease go and exit, so that Kubernetes restarts the container (liveness fails
        meanwhile). The job that met the error reports it as a failed attempt: it counts against
        its backoffLimit, so a job that breaks every GPU it touches cannot go round for ever."""
        with self._lock:
            if self.device_failure is not None:
                return
            self.device_failure = failure
        log.error("device failed, giving every job back and exiting: %s", failure.message)
        self.draining.set()
        for run in [run for run in list(self.runs.values()) if run is not culprit]:
            run.cancel.set()
            self._report(run, ExecutionState.HandedBack, reason=Reason.DeviceFailed,
                         message=f"pool worker {self.settings.name}: {failure.message}")  # fmt: skip
        self.exit_requested.set()

    def stop(self) -> None:
        self.stopped.set()
        self._renew_now.set()
        for watcher in self._watchers:
            watcher.stop()
        for run in list(self.runs.values()):
            run.cancel.set()
        for decoder in self.decoders.values():
            decoder.stop()
        try:
            self.leases.delete_namespaced_lease(self.settings.name, self.settings.namespace)
        except Exception as error:  # noqa: BLE001 - gone already, or the API is down: it expires anyway
            log.info("could not delete the Lease: %s", kube.api_message(error))

    # ------------------------------------------------------------------ the Lease

    def _lease_body(self) -> dict[str, Any]:
        s = self.settings
        meta: dict[str, Any] = {
            "name": s.name,
            "namespace": s.namespace,
            "labels": {contract.LABEL_POOL_WORKER: "true", contract.LABEL_COMPONENT: "pool-worker"},
            "annotations": {
                contract.ANNOTATION_WORKER_MODELS: json.dumps(self.models),
                contract.ANNOTATION_WORKER_CAPACITY: str(s.capacity),
                contract.ANNOTATION_WORKER_DRAINING: "true" if self.draining.is_set() else "false",
                contract.ANNOTATION_WORKER_NODE: s.node_name or "",
                contract.ANNOTATION_WORKER_RUNNING: str(len(self.runs)),
            },
        }
        if s.pod_uid:  # the Lease goes with its pod
            meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": s.name, "uid": s.pod_uid}]
        now = contract.now_string(micro=True)
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {"holderIdentity": s.name, "leaseDurationSeconds": s.lease_duration_seconds,
                     "acquireTime": now, "renewTime": now},
        }  # fmt: skip

    def _write_lease(self, create: bool = False) -> None:
        from kubernetes.client.exceptions import ApiException

        body = self._lease_body()
        if create:
            try:
                self.leases.create_namespaced_lease(self.settings.namespace, body)
                return
            except ApiException as error:
                if error.status != 409:
                    raise
        body["spec"].pop("acquireTime")
        self.leases.patch_namespaced_lease(self.settings.name, self.settings.namespace,
                                           {"metadata": {"annotations": body["metadata"]["annotations"]},
                                            "spec": body["spec"]})  # fmt: skip

    def healthy(self) -> bool:
        """False once the device failed, or when jobs run but none has made progress for
        stall_seconds (a stuck device, a hang)."""
        if self.device_failure is not None:
            return False
        runs = list(self.runs.values())
        if not runs:
            return True
        return time.monotonic() - max(run.last_progress for run in runs) < self.settings.stall_seconds

    def _write_lease_soon(self) -> None:
        """Renew now rather than at the next interval: the running count on the Lease changed."""
        self._renew_now.set()

    def _renew_forever(self) -> None:
        while not self.stopped.is_set():
            self._renew_now.wait(self.settings.renew_interval_seconds)
            self._renew_now.clear()
            if self.stopped.is_set():
                break
            if not self.healthy():
                # Let the Lease lapse: the operator gives the jobs to another worker, and the
                # liveness probe (same check) restarts this one.
                log.error("no progress for %.0f s with jobs running: not renewing the Lease", self.settings.stall_seconds)
                continue
            try:
                self._write_lease(create=True)
            except Exception as error:  # noqa: BLE001 - the apiserver may come back before the Lease lapses
                log.warning("Lease renewal failed: %s", kube.api_message(error))

    # ------------------------------------------------------------------ assignments

    def _on_list(self, items: list[dict[str, Any]]) -> None:
        present = {(tj["metadata"]["namespace"], tj["metadata"]["name"]) for tj in items}
        for key, run in list(self.runs.items()):
            if key not in present:
                run.cancel.set()
        for tj in items:
            self._on_event("MODIFIED", tj)

    def _on_event(self, kind: str, tj: dict[str, Any]) -> None:
        meta, status = tj["metadata"], tj.get("status") or {}
        key = (meta["namespace"], meta["name"])
        assignment = status.get("assignment") or {}
        mine = assignment.get("worker") == self.settings.name
        with self._lock:
            if kind == "DELETED" or contract.is_terminal(tj):
                self.started.pop(meta.get("uid"), None)
            run = self.runs.get(key)
            if run is not None and (kind == "DELETED" or run.uid != meta.get("uid") or not mine
                                    or assignment.get("attempt") != run.attempt or contract.is_terminal(tj)):
                log.info("%s/%s: no longer this worker's attempt %d; stopping it", *key, run.attempt)
                run.cancel.set()
                if mine and kind != "DELETED" and not contract.is_terminal(tj):
                    self.superseded[key] = tj  # a newer attempt for this worker: start it once this one stops
                return
            if kind == "DELETED" or not mine or run is not None or contract.is_terminal(tj):
                return
            execution = status.get("execution") or {}
            run = Run(meta["namespace"], meta["name"], meta["uid"], int(assignment["attempt"]))
            if execution.get("attempt") == run.attempt and execution.get("worker") == self.settings.name:
                if self.started.get(run.uid) == run.attempt or execution.get("state") != "Running":
                    return  # this attempt already ran here (a relist after a restart of the watch)
                lost = True
            else:
                lost = False
                self.runs[key] = run
                self.started[run.uid] = run.attempt
        if lost:
            # Its run died with the previous process: fail the attempt (it may be what killed that
            # process), so the operator retries it within spec.backoffLimit instead of waiting forever.
            log.warning("%s/%s: attempt %d was running when this worker restarted", *key, run.attempt)
            self._report(run, ExecutionState.Failed, reason=Reason.WorkerRestarted, bad_input=False,
                         message=f"pool worker {self.settings.name} restarted while it ran attempt {run.attempt}")
            return
        if self.draining.is_set() or len(self.runs) > self.settings.capacity:
            self._forget(run)
            reason = Reason.WorkerDraining if self.draining.is_set() else Reason.WorkerFull
            if reason == Reason.WorkerFull:
                self._write_lease_soon()  # the operator learns how many it holds before it assigns again
            self._report(run, ExecutionState.HandedBack, reason=reason, message=f"pool worker {self.settings.name}: {reason}")
            return
        run.thread = threading.Thread(target=self._run_job, args=(run, tj), name=f"job-{meta['name']}", daemon=True)
        run.thread.start()

    def _forget(self, run: Run) -> None:
        with self._lock:
            if self.runs.get(run.key) is run:
                del self.runs[run.key]
                if len(self.runs) + 1 >= self.settings.capacity:
                    self._write_lease_soon()  # it was full: say there is room again
            newer = self.superseded.pop(run.key, None)
        if newer is not None and not self.stopped.is_set():
            self._on_event("MODIFIED", newer)

    # ------------------------------------------------------------------ one job

    def _run_job(self, run: Run, tj: dict[str, Any]) -> None:
        try:
            attempt = PoolAttempt(self, run)
            attempt.report(ExecutionState.Running)
            execute.run(tj, attempt, self.runner, self.result_settings, self.core)
        finally:
            self._forget(run)

    def _report(self, run: Run, state: ExecutionState, **fields: Any) -> None:
        PoolAttempt(self, run).report(state, **fields)


class PoolAttempt(execute.Attempt):
    """One attempt a pool worker runs. Every write first tests that the job is still this worker's
    attempt (an atomic JSON patch), so a worker that lost its job never overwrites the next one's;
    the attempt's end is reported in status.execution for the operator to act on."""

    runtime = Runtime.Pool

    def __init__(self, worker: Worker, run: Run):
        self.worker = worker
        self.run = run

    def check(self) -> None:
        if self.run.cancel.is_set():
            raise Cancelled()

    def audio(self, spec: TranscriptionJobSpec, settings: RunnerSettings) -> str | np.ndarray:
        from ifw.runner import pipeline

        model = spec.model or settings.default_model
        worker = self.worker.settings
        if model not in self.worker.models:
            raise HandBack(Reason.ModelNotServed, f"pool worker {worker.name} holds {self.worker.models}, not {model!r}")
        audio = pipeline.load(spec.audio.url, settings, multichannel=spec.multichannel, report=self.decode_report)
        self.check()
        duration = audio.shape[-1] / SAMPLE_RATE  # (channels, samples) for a multichannel job
        if duration > worker.max_audio_seconds and spec.runtime != Runtime.Pool:
            raise HandBack(Reason.AudioTooLongForPool,
                           f"{duration:.0f} s of audio is over the pool's {worker.max_audio_seconds:g} s")  # fmt: skip
        self.run.last_progress = time.monotonic()
        return audio

    def decoder(self, spec: TranscriptionJobSpec) -> Decode | None:
        return self.worker.decoders[spec.model or self.worker.runner.default_model].session(self.check)

    @property
    def processed_by(self) -> ProcessedBy:
        return ProcessedBy(pod=self.worker.settings.name, node=self.worker.settings.node_name, runtime=self.runtime)

    def write(self, status: dict[str, Any]) -> None:
        self.check()
        self.run.last_progress = time.monotonic()
        self._patch(status)

    def finish(self, final: dict[str, Any]) -> None:
        self._patch({**final, "execution": self._execution(ExecutionState.Succeeded)})

    def fail(self, failure: contract.Failure) -> None:
        if failure.reason == Reason.DeviceFailed:
            self.worker.device_failed(failure, culprit=self.run)
        if self.run.cancel.is_set():
            return  # handed back already (the device failed during another job)
        self.report(ExecutionState.Failed, reason=failure.reason, message=failure.message, bad_input=failure.bad_input)

    def hand_back(self, back: HandBack) -> None:
        self.report(ExecutionState.HandedBack, reason=back.reason, message=back.message)

    def report(self, state: ExecutionState, **fields: Any) -> None:
        """status.execution: best effort (the operator sees the Lease and re-assigns if need be)."""
        try:
            self._patch({"execution": self._execution(state, **fields)})
        except Cancelled:
            pass
        except Exception as error:  # noqa: BLE001 - see the docstring
            log.warning("%s/%s: could not report %s: %s", *self.run.key, state, kube.api_message(error))

    def _execution(self, state: ExecutionState, **fields: Any) -> dict[str, Any]:
        run = self.run
        body: dict[str, Any] = {"worker": self.worker.settings.name, "attempt": run.attempt, "state": state}
        now = contract.now_string()
        if state == ExecutionState.Running:
            body["startTime"] = run.started = now
        else:
            body["finishTime"] = now
            if run.started:  # kept when a later report replaces the entry
                body["startTime"] = run.started
        body.update({k if k != "bad_input" else "badInput": v for k, v in fields.items() if v is not None})
        return body

    def _patch(self, fields: dict[str, Any]) -> None:
        """Write status fields only while the job is still this worker's attempt (atomic test + add)."""
        run = self.run
        tests = {"/metadata/uid": run.uid, "/status/assignment/worker": self.worker.settings.name,
                 "/status/assignment/attempt": run.attempt}  # fmt: skip
        ops = [{"op": "add", "path": f"/status/{key}", "value": value} for key, value in fields.items()]
        try:
            patched = self.worker.tjs.json_patch(run.namespace, run.name, kube.guarded(tests, ops), status=True)
        except Exception as error:
            message = f"could not update the status of {run.namespace}/{run.name}: {kube.api_message(error)}"
            raise errors.RunnerError(message) from error
        if patched is None:  # deleted, or a test failed: assigned elsewhere now
            run.cancel.set()
            raise Cancelled()


def serve_health(worker: Worker, port: int) -> None:
    """/healthz: the process works (the stall check); /readyz: it takes work. Plain stdlib HTTP."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/metrics":
                body, code, kind = generate_latest(), 200, CONTENT_TYPE_LATEST
            elif self.path in ("/healthz", "/readyz"):
                ok = worker.healthy() and (self.path == "/healthz" or not worker.draining.is_set())
                body, code, kind = (b"ok" if ok else b"unhealthy"), (200 if ok else 503), "text/plain"
            else:
                body, code, kind = b"not found", 404, "text/plain"
            self.send_response(code)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="worker-health", daemon=True).start()


def main(settings: WorkerSettings | None = None) -> int:
    """`ifw-runner serve`: run until SIGTERM, then drain."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request's full URL at INFO: presigned queries and upload tokens included.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings = settings or WorkerSettings()
    except ValidationError as error:
        log.error("bad worker settings: %s", error)
        return contract.EXIT_BAD_INPUT
    worker = Worker(settings, get_settings(), kube.api_client(component="runner-worker"))
    signal.signal(signal.SIGTERM, lambda *_: worker.exit_requested.set())
    signal.signal(signal.SIGINT, lambda *_: worker.exit_requested.set())
    worker.start()
    if settings.health_port:
        serve_health(worker, settings.health_port)
    worker.exit_requested.wait()
    if worker.device_failure is not None:
        worker.stop()  # its jobs are handed back already
        return contract.EXIT_TRANSIENT
    worker.drain()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
