"""Where finished transcripts live: pluggable result stores, shared by runner, operator and gateway.

Results never go into the TranscriptionJob (etcd caps objects near 1.5 MiB and every watcher
would receive every byte). The runner stores the Transcript as gzip-compressed JSON and records
a pointer in ``status.result``:

  {"store": "secret"|"s3", "ref": <Secret name | s3://bucket/key>, "sizeBytes", "sha256", "formats"}

- ``secret`` (the default, needs nothing else): one Secret per job, ``<job>-result``. The
  operator creates it empty (``result_secret``: its owner reference, labels and type are built
  there, once); the runner only patches its ``data`` and the checksum annotation. Capped by
  ``ResultSettings.result_secret_max_bytes``.
- ``s3``: any S3-compatible store through boto3; key ``<prefix><namespace>/<job>/<uid>.json.gz``;
  credentials from the standard ``AWS_*`` variables, endpoint from ``IFW_S3_ENDPOINT_URL``.

The runner writes (``store_result``), the gateway and the webhook sender read (``load_result``),
the operator deletes on TTL (``delete_result``). Every one of them reads the same
``ResultSettings`` from the environment, so the chart must give all of them the same IFW_S3_*.
The compressed bytes are deterministic (gzip mtime 0), so a retried runner writes the same sha256.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from ifw.core import contract
from ifw.core.formats import FORMATS
from ifw.core.settings import EnvNamed
from ifw.core.transcript import Transcript

log = logging.getLogger(__name__)

SECRET_TYPE = "ifw.dev/result"  # a Secret's type is immutable: the operator creates it with this one
SECRET_KEY = "transcript.json.gz"
_SECRET_SUFFIX = "-result"


class ResultSettings(EnvNamed):
    """The result store's settings (env prefix IFW_), read alike by every component that touches results."""

    model_config = SettingsConfigDict(env_prefix="IFW_", extra="ignore")

    result_store: Literal["secret", "s3"] = "secret"
    result_secret_max_bytes: int = Field(
        900 * 1024, description="Compressed results above this fail with ResultTooLarge (etcd caps objects)."
    )
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = "results/"
    s3_region: str = "us-east-1"


class ResultStoreFailed(contract.Failure):
    """The store could not be written or read: worth a retry."""

    reason = contract.Reason.ResultStoreFailed


class ResultNotFound(ResultStoreFailed):
    """The result is gone (deleted on TTL, or never written)."""

    reason = contract.Reason.ResultNotFound


class ResultTooLarge(ResultStoreFailed):
    reason = contract.Reason.ResultTooLarge


@dataclass(frozen=True)
class JobRef:
    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, job: Any) -> JobRef:
        """From a raw object as read from the API, a model with ``.metadata``, or a JobRef."""
        if isinstance(job, JobRef):
            return job
        meta = job.get("metadata") if isinstance(job, Mapping) else getattr(job, "metadata", None)
        meta = meta or {}
        missing = [key for key in ("namespace", "name", "uid") if not meta.get(key)]
        if missing:
            raise ResultStoreFailed(f"the TranscriptionJob's metadata lacks {', '.join(missing)}")
        return cls(meta["namespace"], meta["name"], meta["uid"])


# ------------------------------------------------------------------ encoding


def encode(transcript: Transcript) -> bytes:
    """gzip JSON with a fixed mtime: the same transcript always gives the same bytes (and sha256)."""
    return gzip.compress(transcript.model_dump_json(exclude_none=True).encode(), compresslevel=9, mtime=0)


def decode(data: bytes, expected_sha256: str | None = None) -> Transcript:
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ResultStoreFailed("the stored result does not match its sha256: corrupt or replaced")
    try:
        return Transcript.model_validate_json(gzip.decompress(data))
    except (OSError, EOFError, ValueError) as error:
        raise ResultStoreFailed(f"the stored result cannot be read: {error}") from error


def _ref(store: str, ref: str, data: bytes) -> dict[str, Any]:
    return {
        "store": store,
        "ref": ref,
        "sizeBytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "formats": list(FORMATS),
    }


def store_result(
    transcript: Transcript, job: Any, settings: ResultSettings, *, core_v1: Any = None, s3: Any = None
) -> dict[str, Any]:
    """Store the transcript in settings.result_store; returns the value for status.result."""
    ref = JobRef.of(job)
    data = encode(transcript)
    if settings.result_store == "secret":
        return _store_secret(data, ref, settings, _need(core_v1))
    if settings.result_store == "s3":
        return _store_s3(data, ref, settings, s3 or s3_client(settings))
    raise ResultStoreFailed(f"unknown result store {settings.result_store!r}")


def load_result(
    ref: Mapping[str, Any],
    namespace: str,
    *,
    job_uid: str | None = None,
    settings: ResultSettings | None = None,
    core_v1: Any = None,
    s3: Any = None,
) -> Transcript:
    """Read back what store_result wrote (``ref`` is status.result); checks the sha256.

    With ``job_uid``, a Secret left by an earlier job of the same name is refused.
    """
    store, where = ref.get("store"), ref.get("ref")
    if not where:
        raise ResultStoreFailed("status.result has no ref")
    if store == "secret":
        data = _read_secret(where, namespace, job_uid, _need(core_v1))
    elif store == "s3":
        data = _read_s3(where, s3 or s3_client(settings or ResultSettings()))
    else:
        raise ResultStoreFailed(f"unknown result store {store!r}")
    return decode(data, ref.get("sha256"))


def delete_result(
    ref: Mapping[str, Any],
    namespace: str,
    *,
    settings: ResultSettings | None = None,
    core_v1: Any = None,
    s3: Any = None,
) -> bool:
    """Remove a stored result (the operator's cleanup). True if something was deleted."""
    store, where = ref.get("store"), ref.get("ref")
    if store == "secret":
        return _delete_secret(where, namespace, _need(core_v1))
    if store == "s3":
        return _delete_s3(where, s3 or s3_client(settings or ResultSettings()))
    raise ResultStoreFailed(f"unknown result store {store!r}")


def _need(core_v1: Any) -> Any:
    if core_v1 is None:
        raise TypeError("the Secret store needs a CoreV1Api (core_v1=...) from the caller's one client")
    return core_v1


# ------------------------------------------------------------------ secret store


def secret_name(job_name: str) -> str:
    """``<job>-result``, deterministic; names too long for a Secret keep a hash of the full name."""
    return contract.fit_name(job_name, 253 - len(_SECRET_SUFFIX)) + _SECRET_SUFFIX


def result_secret(tj: Mapping[str, Any]) -> dict[str, Any]:
    """The empty result Secret the operator creates for a TranscriptionJob (owner, labels, type: once, here)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE,
        "metadata": contract.child_metadata(tj, secret_name(tj["metadata"]["name"]), "result"),
    }


def _api_error(action: str, error: Exception) -> ResultStoreFailed:
    status = getattr(error, "status", None)
    detail = getattr(error, "reason", None) or str(error)
    return ResultStoreFailed(f"{action}: {f'HTTP {status} ' if status else ''}{detail}")


def _store_secret(data: bytes, job: JobRef, settings: ResultSettings, core_v1: Any) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    cap = settings.result_secret_max_bytes
    if len(data) > cap:
        raise ResultTooLarge(
            f"the compressed result is {len(data)} bytes, over the Secret store's limit of {cap} bytes "
            "(etcd caps objects); use the S3 result store for long audio (IFW_RESULT_STORE=s3 with "
            "IFW_S3_BUCKET, and IFW_S3_ENDPOINT_URL for a store other than AWS; in the Helm chart: "
            "results.store=s3 and results.s3.bucket)"
        )
    name = secret_name(job.name)
    digest = hashlib.sha256(data).hexdigest()
    # Only the data and its checksum: the operator's owner reference, labels and type stay as built.
    patch = {
        "metadata": {"annotations": {contract.ANNOTATION_RESULT_SHA256: digest}},
        "data": {SECRET_KEY: base64.b64encode(data).decode()},
    }
    try:
        current = core_v1.read_namespaced_secret(name, job.namespace)
        owner = (current.metadata.labels or {}).get(contract.LABEL_JOB_UID)
        if owner != job.uid:
            raise ResultStoreFailed(
                f"Secret {job.namespace}/{name} belongs to another TranscriptionJob (uid {owner}), not {job.uid}"
            )
        # The resourceVersion makes the write conditional on what was just checked.
        patch["metadata"]["resourceVersion"] = current.metadata.resource_version
        core_v1.patch_namespaced_secret(name, job.namespace, patch)
    except ApiException as error:
        if error.status == 404:
            raise ResultStoreFailed(
                f"result Secret {job.namespace}/{name} does not exist: the operator creates it before the runner "
                "starts (a runner's Role may patch it but not create it)"
            ) from error
        if error.status == 413:
            raise ResultTooLarge(f"the apiserver refused the result Secret as too large: {error.reason}") from error
        raise _api_error(f"cannot write Secret {job.namespace}/{name}", error) from error
    except ResultStoreFailed:
        raise
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
    if job_uid and labels.get(contract.LABEL_JOB_UID) != job_uid:
        raise ResultNotFound(
            f"Secret {namespace}/{name} belongs to another job (uid {labels.get(contract.LABEL_JOB_UID)})"
        )
    encoded = (secret.data or {}).get(SECRET_KEY)
    if not encoded:
        raise ResultStoreFailed(f"Secret {namespace}/{name} has no {SECRET_KEY}")
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


def s3_client(settings: ResultSettings) -> Any:
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


def s3_key(settings: ResultSettings, job: JobRef) -> str:
    return f"{settings.s3_prefix}{job.namespace}/{job.name}/{job.uid}.json.gz"


def parse_s3_ref(ref: str) -> tuple[str, str]:
    match = re.fullmatch(r"s3://([^/]+)/(.+)", ref or "")
    if not match:
        raise ResultStoreFailed(f"not an s3://bucket/key reference: {ref!r}")
    return match.group(1), match.group(2)


def _s3_error(action: str, error: Exception) -> ResultStoreFailed:
    return ResultStoreFailed(f"{action}: {error}")  # botocore names the error code and operation


def _store_s3(data: bytes, job: JobRef, settings: ResultSettings, s3: Any) -> dict[str, Any]:
    from botocore.exceptions import BotoCoreError, ClientError

    if not settings.s3_bucket:
        raise ResultStoreFailed("IFW_S3_BUCKET must be set when the result store is s3")
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
