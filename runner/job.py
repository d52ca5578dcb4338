"""Job mode: what the runner Pod does (`python -m ifw.runner job`).

The contract with the operator (see DESIGN.md):
- read our own TranscriptionJob (IFW_JOB_NAMESPACE / IFW_JOB_NAME) and refuse
  it when its uid is not IFW_JOB_UID (the job was deleted and recreated);
- run the pipeline on spec.audio.url, writing ONLY status.progress,
  status.audio, status.speakers and status.result, through the /status
  subresource with merge patches (the operator owns every other status field);
- store the result, exit 0;
- on failure write {"reason", "message"} to the termination log and exit 2
  (bad input: never retried) or 1 (transient: retried up to backoffLimit).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from pydantic import ValidationError

from ifw.core import contract, kube, results
from ifw.core.transcript import ProcessedBy
from ifw.crds.transcriptionjob import GROUP, PLURAL, VERSION, TranscriptionJobSpec
from ifw.runner import errors
from ifw.runner.config import RunnerSettings, get_settings
from ifw.runner.progress import ProgressReporter, final_status, keep_trying, streams

log = logging.getLogger(__name__)


class JobStatus:
    """Reads our TranscriptionJob and merge-patches the runner's part of its status."""

    def __init__(self, api: Any, namespace: str, name: str):
        from kubernetes import client

        self.objects = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.name = name

    def read(self) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.objects.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)
        except ApiException as e:
            if e.status == 404:
                # Deleted (cancelled) before we started: nothing to do, and a retry cannot help.
                raise errors.InvalidSpec(f"TranscriptionJob {self.namespace}/{self.name} does not exist") from e
            raise errors.RunnerError(f"could not read TranscriptionJob {self.namespace}/{self.name}: {e.reason}") from e
        except Exception as e:  # connection refused, TLS, timeouts: the apiserver may come back
            raise errors.RunnerError(f"could not reach the Kubernetes API: {e}") from e

    def patch(self, status: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.objects.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                self.name,
                {"status": status},
                _content_type="application/merge-patch+json",
            )
        except ApiException as e:
            raise errors.RunnerError(f"could not update the status of {self.namespace}/{self.name}: {e.reason}") from e
        except Exception as e:
            raise errors.RunnerError(f"could not reach the Kubernetes API: {e}") from e


def run_job(settings: RunnerSettings, api: Any, result_settings: results.ResultSettings | None = None) -> dict[str, Any]:
    """Run our TranscriptionJob; returns the status the runner wrote at the end."""
    from kubernetes import client

    from ifw.runner import pipeline

    missing = [var for var, value in ((contract.ENV_JOB_NAMESPACE, settings.job_namespace),
                                      (contract.ENV_JOB_NAME, settings.job_name),
                                      (contract.ENV_JOB_UID, settings.job_uid)) if not value]  # fmt: skip
    if missing:
        raise errors.InvalidSpec(f"job mode needs {', '.join(missing)} (set by the operator)")
    status = JobStatus(api, settings.job_namespace, settings.job_name)
    job = status.read()
    uid = job.get("metadata", {}).get("uid")
    if uid != settings.job_uid:
        raise errors.InvalidSpec(
            f"TranscriptionJob {settings.job_namespace}/{settings.job_name} has uid {uid}, "
            f"not {settings.job_uid}: it was deleted and recreated; this pod belongs to the old one"
        )
    try:
        spec = TranscriptionJobSpec.model_validate(job.get("spec") or {})
    except ValidationError as e:
        raise errors.InvalidSpec(f"invalid spec: {e}") from e

    def report(body: dict[str, Any]) -> None:
        # The duration is known once the audio is decoded: show it (kubectl's Duration column) from then on.
        status.patch({"progress": body, "audio": {"durationSeconds": body["totalSeconds"]}})

    reporter = ProgressReporter(report, settings.progress_interval_seconds)
    transcript = pipeline.run(spec, spec.audio.url, settings, on_progress=reporter,
                              on_text=reporter.text if streams(job) else None)  # fmt: skip
    reporter.flush()
    transcript.processed_by = ProcessedBy(pod=settings.pod_name, node=settings.node_name, runtime="Job")

    store = result_settings or results.ResultSettings()
    # From here on the work is done: outages of the API or the store are waited out, not redone.
    result = keep_trying(lambda: results.store_result(transcript, job, store, core_v1=client.CoreV1Api(api)),
                         seconds=settings.result_write_retry_seconds, what="storing the result")  # fmt: skip
    final = final_status(transcript, result, stream=streams(job))
    keep_trying(lambda: status.patch(final), seconds=settings.result_write_retry_seconds,
                what="writing the final status")  # fmt: skip
    return final


def main(settings: RunnerSettings | None = None) -> int:
    """The Pod's entry point; returns the exit code (0, 1 transient, 2 bad input)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request's full URL at INFO: presigned queries and upload tokens included.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings = settings or get_settings()
        with kube.api_client(component="runner") as api:  # one client for the status and the result
            final = run_job(settings, api)
        log.info("done: %s", final["result"].get("ref"))
        return 0
    except contract.Failure as e:
        error = e
    except MemoryError as e:
        error = errors.OutOfMemory(f"out of host memory: {e}")
    except Exception as e:  # noqa: BLE001 - anything unforeseen is worth a retry
        log.exception("unexpected failure")
        error = errors.RunnerError(f"unexpected {type(e).__name__}: {e}")
    log.error("%s: %s", error.reason, error.message)
    errors.write_termination_message(error)
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
