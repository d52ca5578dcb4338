"""Where finished transcripts live: pluggable result stores.

Results never go into the TranscriptionJob (etcd caps objects near 1.5 MiB and
every watcher would receive every byte). The runner stores the Transcript as
gzip-compressed JSON and records a pointer in `status.result`:

  {"store": "secret"|"s3", "ref": <Secret name | s3://bucket/key>, "sizeBytes", "sha256", "formats"}

- "secret" (default, needs nothing else): one Secret per job, `<job>-result`,
  owned by the TranscriptionJob so it goes when the job goes. Capped by
  settings.result_secret_max_bytes.
- "s3": any S3-compatible store through boto3; key
  `<prefix><namespace>/<job>/<uid>.json.gz`; credentials from the standard
  AWS_* variables (a Secret in the pod), endpoint from settings.s3_endpoint_url.

The gateway reads results back with `load_result`, the operator removes them on
TTL with `delete_result`. The compressed bytes are deterministic (gzip mtime 0),
so a retried runner writes the same sha256.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ifw.crds.transcriptionjob import API_VERSION, KIND, TranscriptionJob
from ifw.runner import errors
from ifw.runner.config import RunnerSettings
from ifw.runner.formats import FORMATS
from ifw.runner.result import Transcript

log = logging.getLogger(__name__)

SECRET_TYPE = "ifw.dev/result"
SECRET_KEY = "transcript.json.gz"
LABEL_JOB_NAME = "ifw.dev/job-name"
LABEL_JOB_UID = "ifw.dev/job-uid"
ANNOTATION_SHA256 = "ifw.dev/sha256"
_SECRET_SUFFIX = "-result"


class ResultNotFound(errors.ResultStoreFailed):
    """The result is gone (deleted on TTL, or never written)."""

    reason = "ResultNotFound"


@dataclass(frozen=True)
class JobRef:
    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, job: JobRef | TranscriptionJob | Mapping[str, Any]) -> JobRef:
        """From a TranscriptionJob model, a raw object as read from the API, or a JobRef."""
        if isinstance(job, JobRef):
            return job
        meta = job.metadata if isinstance(job, TranscriptionJob) else (job.get("metadata") or {})
        missing = [key for key in ("namespace", "name", "uid") if not meta.get(key)]
        if missing:
            raise errors.ResultStoreFailed(f"the TranscriptionJob's metadata lacks {', '.join(missing)}")
        return cls(meta["namespace"], meta["name"], meta["uid"])


# ------------------------------------------------------------------ encoding


def encode(transcript: Transcript) -> bytes:
    """gzip JSON with a fixed mtime: the same transcript always gives the same bytes (and sha256)."""
    return gzip.compress(transcript.model_dump_json(exclude_none=True).encode(), compresslevel=9, mtime=0)


def decode(data: bytes, expected_sha256: str | None = None) -> Transcript:
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise errors.ResultStoreFailed("the stored result does not match its sha256: corrupt or replaced")
    try:
        return Transcript.model_validate_json(gzip.decompress(data))
    except (OSError, EOFError, ValueError) as error:
        raise errors.ResultStoreFailed(f"the stored result cannot be read: {error}") from error


def _ref(store: str, ref: str, data: bytes) -> dict[str, Any]:
    return {
        "store": store,
        "ref": ref,
        "sizeBytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "formats": list(FORMATS),
    }


def store_result(
    transcript: Transcript,
    job: JobRef | TranscriptionJob | Mapping[str, Any],
    settings: RunnerSettings,
    *,
    core_v1: Any = None,
    s3: Any = None,
) -> dict[str, Any]:
    """Store the transcript in settings.result_store; returns the value for status.result."""
    ref = JobRef.of(job)
    data = encode(transcript)
    if settings.result_store == "secret":
        return _store_secret(data, ref, settings, core_v1 or _core_v1())
    if settings.result_store == "s3":
        return _store_s3(data, ref, settings, s3 or s3_client(settings))
    raise errors.ResultStoreFailed(f"unknown result store {settings.result_store!r}")


def load_result(
    ref: Mapping[str, Any],
    namespace: str,
    *,
    job_uid: str | None = None,
    settings: RunnerSettings | None = None,
    core_v1: Any = None,
    s3: Any = None,
) -> Transcript:
    """Read back what store_result wrote (`ref` is status.result); checks the sha256.

    With `job_uid`, a Secret left by an earlier job of the same name is refused.
    """
    store, where = ref.get("store"), ref.get("ref")
    if not where:
        raise errors.ResultStoreFailed("status.result has no ref")
    if store == "secret":
        data = _read_secret(where, namespace, job_uid, core_v1 or _core_v1())
    elif store == "s3":
        data = _read_s3(where, s3 or s3_client(settings or RunnerSettings()))
    else:
        raise errors.ResultStoreFailed(f"unknown result store {store!r}")
    return decode(data, ref.get("sha256"))


def delete_result(
    ref: Mapping[str, Any],
    namespace: str,
    *,
    settings: RunnerSettings | None = None,
    core_v1: Any = None,
    s3: Any = None,
) -> bool:
    """Remove a stored result (the operator's TTL cleanup). True if something was deleted."""
    store, where = ref.get("store"), ref.get("ref")
    if store == "secret":
        return _delete_secret(where, namespace, core_v1 or _core_v1())
    if store == "s3":
        return _delete_s3(where, s3 or s3_client(settings or RunnerSettings()))
    raise errors.ResultStoreFailed(f"unknown result store {store!r}")


# ------------------------------------------------------------------ secret store


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def secret_name(job_name: str) -> str:
    """`<job>-result`, deterministic; names too long for a Secret keep a hash of the full name."""
    name = job_name + _SECRET_SUFFIX
    if len(name) <= 253:
        return name
    head = job_name[: 253 - len(_SECRET_SUFFIX) - 9].rstrip("-.")
    return f"{head}-{_short_hash(job_name)}{_SECRET_SUFFIX}"


def label_value(value: str) -> str:
    """A valid label value (≤63 chars, alphanumeric ends); long ones keep a hash."""
    if len(value) <= 63 and re.fullmatch(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]", value):
        return value
    head = re.sub(r"[^-A-Za-z0-9_.]", "-", value)[:54].strip("-_.")
    return f"{head}-{_short_hash(value)}" if head else _short_hash(value)


def _core_v1() -> Any:
    """In the pod: the service account; elsewhere: the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api()


def _secret_body(data: bytes, job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE,
        "metadata": {
            "name": secret_name(job.name),
            "namespace": job.namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "ifw",
                "app.kubernetes.io/component": "result",
                LABEL_JOB_NAME: label_value(job.name),
                LABEL_JOB_UID: job.uid,
            },
            "annotations": {ANNOTATION_SHA256: hashlib.sha256(data).hexdigest()},
            # Owned (not controlled) by the job: garbage-collected with it.
            "ownerReferences": [{"apiVersion": API_VERSION, "kind": KIND, "name": job.name, "uid": job.uid}],
        },
        "data": {SECRET_KEY: base64.b64encode(data).decode()},
    }


def _api_error(action: str, error: Exception) -> errors.ResultStoreFailed:
    status = getattr(error, "status", None)
    detail = getattr(error, "reason", None) or str(error)
    return errors.ResultStoreFailed(f"{action}: {f'HTTP {status} ' if status else ''}{detail}")


def _store_secret(data: bytes, job: JobRef, settings: RunnerSettings, core_v1: Any) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    cap = settings.result_secret_max_bytes
    if len(data) > cap:
        raise errors.ResultTooLarge(
            f"the compressed result is {len(data)} bytes, over the Secret store's limit of {cap} bytes "
            "(etcd caps objects); use the S3 result store for long audio (IFW_RESULT_STORE=s3 with "
            "IFW_S3_BUCKET and IFW_S3_ENDPOINT_URL, or the Helm value results.store=s3)"
        )
    body = _secret_body(data, job)
    name = body["metadata"]["name"]
    try:
        try:
            # The operator pre-creates this Secret: the runner's Role may update it by name but
            # cannot create (create cannot be limited by resourceNames). Replace first, so a
            # retried runner also just overwrites its earlier write.
            core_v1.replace_namespaced_secret(name, job.namespace, body)
        except ApiException as error:
            if error.status != 404:
                raise
            core_v1.create_namespaced_secret(job.namespace, body)  # no operator (e.g. a hand-run job)
    except ApiException as error:
        if error.status == 413:
            raise errors.ResultTooLarge(f"the apiserver refused the result Secret as too large: {error.reason}")
        raise _api_error(f"cannot write Secret {job.namespace}/{name}", error) from error
    except Exception as error:  # urllib3 connection errors and the like: transient
        raise _api_error(f"cannot write Secret {job.namespace}/{name}", error) from error
    log.info("stored result in Secret %s/%s (%d bytes)", job.namespace, name, len(data))
    return _ref("secret", name, data)


def _read_secret(name: str, namespace: str, job_uid: str | None, core_v1: Any) -> bytes:
    from kubernetes.client.exceptions import ApiException

    try:
        secret = core_v1.read_namespaced_secret(name, namespace)
    except ApiException as error:
        if error.status == 404:
            raise ResultNotFound(f"result Secret {namespace}/{name} not found (expired or deleted)") from error
        raise _api_error(f"cannot read Secret {namespace}/{name}", error) from error
    labels = secret.metadata.labels or {}
    if job_uid and labels.get(LABEL_JOB_UID) != job_uid:
        raise ResultNotFound(f"Secret {namespace}/{name} belongs to another job (uid {labels.get(LABEL_JOB_UID)})")
    encoded = (secret.data or {}).get(SECRET_KEY)
    if not encoded:
        raise errors.ResultStoreFailed(f"Secret {namespace}/{name} has no {SECRET_KEY}")
    return base64.b64decode(encoded)


def _delete_secret(name: str | None, namespace: str, core_v1: Any) -> bool:
    from kubernetes.client.exceptions import ApiException

    if not name:
        return False
    try:
        core_v1.delete_namespaced_secret(name, namespace)
        return True
    except ApiException as error:
        if error.status == 404:
            return False
        raise _api_error(f"cannot delete Secret {namespace}/{name}", error) from error


# ------------------------------------------------------------------ S3 store


def s3_client(settings: RunnerSettings) -> Any:
    """A boto3 S3 client; credentials come from AWS_* variables / the usual boto3 chain."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        # Self-hosted S3 (MinIO, SeaweedFS, Ceph) rarely serves virtual-host buckets.
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
    )
    return boto3.client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region, config=config)


def s3_key(settings: RunnerSettings, job: JobRef) -> str:
    return f"{settings.s3_prefix}{job.namespace}/{job.name}/{job.uid}.json.gz"


def parse_s3_ref(ref: str) -> tuple[str, str]:
    match = re.fullmatch(r"s3://([^/]+)/(.+)", ref or "")
    if not match:
        raise errors.ResultStoreFailed(f"not an s3://bucket/key reference: {ref!r}")
    return match.group(1), match.group(2)


def _s3_error(action: str, error: Exception) -> errors.ResultStoreFailed:
    return errors.ResultStoreFailed(f"{action}: {error}")  # botocore names the error code and operation


def _store_s3(data: bytes, job: JobRef, settings: RunnerSettings, s3: Any) -> dict[str, Any]:
    from botocore.exceptions import BotoCoreError, ClientError

    if not settings.s3_bucket:
        raise errors.ResultStoreFailed("IFW_S3_BUCKET must be set when the result store is s3")
    key = s3_key(settings, job)
    digest = hashlib.sha256(data).hexdigest()
    try:
        s3.put_object(
            Bucket=settings.s3_bucket,
            Key=key,
            Body=data,
            ContentType="application/json",
            ContentEncoding="gzip",
            Metadata={"sha256": digest, "job-uid": job.uid, "job-namespace": job.namespace},
        )
    except (BotoCoreError, ClientError) as error:
        raise _s3_error(f"cannot write s3://{settings.s3_bucket}/{key}", error) from error
    log.info("stored result at s3://%s/%s (%d bytes)", settings.s3_bucket, key, len(data))
    return _ref("s3", f"s3://{settings.s3_bucket}/{key}", data)


def _read_s3(ref: str, s3: Any) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3_ref(ref)
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            raise ResultNotFound(f"result {ref} not found (expired or deleted)") from error
        raise _s3_error(f"cannot read {ref}", error) from error
    except BotoCoreError as error:
        raise _s3_error(f"cannot read {ref}", error) from error


def _delete_s3(ref: str | None, s3: Any) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    if not ref:
        return False
    bucket, key = parse_s3_ref(ref)
    try:
        s3.delete_object(Bucket=bucket, Key=key)  # S3 answers 204 whether or not it existed
        return True
    except (BotoCoreError, ClientError) as error:
        raise _s3_error(f"cannot delete {ref}", error) from error
