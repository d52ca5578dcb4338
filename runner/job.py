"""Job mode: what the runner Pod does (`python -m ifw.runner job`).

The contract with the operator (the runner ↔ operator contract in README.md and ifw.core.contract):
- read our own TranscriptionJob (IFW_JOB_NAMESPACE / IFW_JOB_NAME) and refuse
  it when its uid is not IFW_JOB_UID (the job was deleted and recreated);
- run the attempt (runner/execute.py), writing ONLY status.progress, status.audio,
  status.speakers and status.result, through the /status subresource with merge
  patches (the operator owns every other status field);
- store the result, exit 0;
- on failure write {"reason", "message"} to the termination log and exit 2
  (bad input: never retried) or 1 (transient: retried up to backoffLimit).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ifw.core import contract, kube, results
from ifw.core.contract import Runtime
from ifw.core.transcript import ProcessedBy
from ifw.runner import errors, execute
from ifw.runner.config import RunnerSettings, get_settings

log = logging.getLogger(__name__)


class JobAttempt(execute.Attempt):
    """The one attempt of a Job's pod: merge patches of its own job's status; a failure leaves
    the pod as its termination message and exit code."""

    runtime = Runtime.Job

    def __init__(self, tjs: kube.TranscriptionJobs, settings: RunnerSettings):
        self.tjs = tjs
        self.settings = settings
        self.namespace, self.name = settings.job_namespace, settings.job_name
        self.exit_code = 0

    def read(self) -> dict[str, Any]:
        """Our TranscriptionJob, checked to be the one the operator made this pod for."""
        s = self.settings
        missing = [RunnerSettings.env_var(field) for field in ("job_namespace", "job_name", "job_uid")
                   if not getattr(s, field)]  # fmt: skip
        if missing:
            raise errors.InvalidSpec(f"job mode needs {', '.join(missing)} (set by the operator)")
        where = f"TranscriptionJob {self.namespace}/{self.name}"
        try:
            tj = self.tjs.get(self.namespace, self.name)
        except Exception as error:  # refused, TLS, timeouts: the apiserver may come back
            raise errors.RunnerError(f"could not read {where}: {kube.api_message(error)}") from error
        if tj is None:  # deleted (cancelled) before we started: nothing to do, and a retry cannot help
            raise errors.InvalidSpec(f"{where} does not exist")
        uid = tj.get("metadata", {}).get("uid")
        if uid != s.job_uid:
            raise errors.InvalidSpec(f"{where} has uid {uid}, not {s.job_uid}: it was deleted and recreated; "
                                     "this pod belongs to the old one")  # fmt: skip
        return tj

    def write(self, status: dict[str, Any]) -> None:
        try:
            self.tjs.patch_status(self.namespace, self.name, status)
        except Exception as error:
            message = f"could not update the status of {self.namespace}/{self.name}: {kube.api_message(error)}"
            raise errors.RunnerError(message) from error

    def fail(self, failure: contract.Failure) -> None:
        errors.write_termination_message(failure)
        self.exit_code = failure.exit_code

    @property
    def processed_by(self) -> ProcessedBy:
        return ProcessedBy(pod=self.settings.pod_name, node=self.settings.node_name, runtime=self.runtime)


def run_job(settings: RunnerSettings, api: Any, result_settings: results.ResultSettings | None = None) -> int:
    """Run our TranscriptionJob; returns the pod's exit code (0, 1 transient, 2 bad input)."""
    from kubernetes import client

    attempt = JobAttempt(kube.TranscriptionJobs(api), settings)
    try:
        tj = attempt.read()
    except contract.Failure as failure:
        attempt.fail(failure)
        return attempt.exit_code
    execute.run(tj, attempt, settings, result_settings or results.ResultSettings(), client.CoreV1Api(api))
    return attempt.exit_code


def main(settings: RunnerSettings | None = None) -> int:
    """The Pod's entry point; returns the exit code (0, 1 transient, 2 bad input)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request's full URL at INFO: presigned queries and upload tokens included.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings = settings or get_settings()
        with kube.api_client(component="runner") as api:  # one client for the status and the result
            return run_job(settings, api)
    except Exception as error:  # noqa: BLE001 - bad settings, no client: still a termination message
        failure = execute.as_failure(error)
        errors.write_termination_message(failure)
        return failure.exit_code


if __name__ == "__main__":
    sys.exit(main())
