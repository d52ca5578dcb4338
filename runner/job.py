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
from typing import TYPE_CHECKING, Any

from ifw.core import contract, kube, results
from ifw.core.contract import Reason, Runtime
from ifw.core.transcript import ProcessedBy
from ifw.crds.transcriptionjob import PARALLELISM_AUTO, TranscriptionJobSpec
from ifw.runner import errors, execute
from ifw.runner.config import RunnerSettings, get_settings

if TYPE_CHECKING:
    import numpy as np

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
        if self.settings.shard_count is not None:  # for kubectl: the Job retries this index (or fails the job)
            try:
                self.write(execute.shard_item({"state": "Failed"}, self, self.settings))
            except Exception as error:  # noqa: BLE001 - the termination message is what counts
                log.warning("could not report the shard's failure: %s", error)

    def audio(self, spec: TranscriptionJobSpec, settings: RunnerSettings) -> str | np.ndarray:
        """spec.parallelism Auto: the audio is loaded first, to decide on its length whether this runner
        transcribes it (it keeps what it loaded) or hands the job back to run as shards."""
        if spec.parallelism != PARALLELISM_AUTO or settings.shard_count is not None or not spec.shardable:
            return spec.audio.url
        from ifw.runner import pipeline
        from ifw.runner.audio import SAMPLE_RATE

        audio = pipeline.load(spec.audio.url, settings, report=self.decode_report)
        duration = len(audio) / SAMPLE_RATE
        count = execute.auto_shards(spec, settings, duration)
        if count > 1:
            raise execute.HandBack(Reason.ShardingRequired, f"{duration:.0f} s of audio is over the "
                                   f"{settings.shard_auto_above_seconds:g} s that Auto runs whole: {count} shards",
                                   shards=count)  # fmt: skip
        return audio

    def hand_back(self, back: execute.HandBack) -> None:
        """Auto on long audio: status.shards.count tells the operator to run the job as that many shards;
        the pod then ends well (exit 0, no retry spent) and the operator replaces its Job."""
        try:
            self.write({"shards": {"count": back.shards}})
        except contract.Failure as failure:
            self.fail(failure)  # transient: the Job runs this pod again, which decides again

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
