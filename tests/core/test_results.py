"""Result stores, round-tripped for real: S3 against SeaweedFS on loopback, Secrets against the test apiserver."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import uuid
from collections.abc import Iterator

import pytest

from ifw.core import contract
from ifw.core import results as stores
from ifw.core.formats import FORMATS
from ifw.core.results import ResultSettings, ResultStoreFailed, ResultTooLarge
from ifw.core.transcript import Segment, SpeakerTurn, Transcript, Word
from ifw.crds.transcriptionjob import GROUP, KIND, PLURAL, VERSION, ResultRef
from tests.core.s3server import SeaweedS3

BUCKET = "ifw-results"


def _transcript(n_segments: int = 3) -> Transcript:
    segments = []
    for i in range(n_segments):
        start = i * 4.0
        words = [Word(start=start + j * 0.5, end=start + j * 0.5 + 0.4, text=f" word{i}_{j}") for j in range(6)]
        segments.append(
            Segment(start=start, end=start + 3.0, text="".join(w.text for w in words),
                    speaker=f"SPEAKER_0{i % 2}", words=words)  # fmt: skip
        )
    return Transcript(
        text="".join(s.text for s in segments),
        segments=segments,
        timestamp="word",
        language="en",
        language_probability=0.97,
        duration=n_segments * 4.0,
        model="tiny.en",
        speakers=[SpeakerTurn(speaker=s.speaker, start=s.start, end=s.end, text=s.text) for s in segments],
    )


def _job(namespace: str = "team-a", name: str = "meeting-42", uid: str | None = None) -> dict:
    return {"metadata": {"namespace": namespace, "name": name, "uid": uid or str(uuid.uuid4())}}


def _check_ref(ref: dict, data: bytes, store: str) -> None:
    assert ref["store"] == store
    assert ref["sizeBytes"] == len(data)
    assert ref["sha256"] == hashlib.sha256(data).hexdigest()
    assert ref["formats"] == list(FORMATS)
    ResultRef.model_validate(ref)  # exactly what status.result accepts (camelCase)


# ---------------------------------------------------------------- encoding


def test_encoding_is_deterministic_and_compact():
    t = _transcript(200)
    a, b = stores.encode(t), stores.encode(t)
    assert a == b  # a retried runner writes the same bytes, so the same sha256
    assert len(a) < len(t.model_dump_json()) / 3
    assert stores.decode(a, hashlib.sha256(a).hexdigest()) == t


def test_decode_refuses_corrupt_or_replaced_data():
    data = stores.encode(_transcript())
    with pytest.raises(ResultStoreFailed, match="sha256"):
        stores.decode(data, "0" * 64)
    with pytest.raises(ResultStoreFailed, match="cannot be read"):
        stores.decode(b"not gzip")


def test_names_stay_valid():
    assert stores.secret_name("meeting-42") == "meeting-42-result"
    long = "a" * 250
    name = stores.secret_name(long)
    assert len(name) <= 253 and name.endswith("-result") and name != stores.secret_name("a" * 249)
    assert contract.label_value("meeting-42") == "meeting-42"
    value = contract.label_value("x" * 100)
    assert len(value) <= 63 and value != contract.label_value("x" * 99)


# ---------------------------------------------------------------- S3 (SeaweedFS on loopback)


@pytest.fixture(scope="module")
def seaweed() -> Iterator[SeaweedS3]:
    with SeaweedS3() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def s3_settings(seaweed, monkeypatch) -> ResultSettings:
    # Credentials the way the pod gets them: standard AWS_* variables (from a Secret).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ifw-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ifw-test-secret")
    return ResultSettings(result_store="s3", s3_endpoint_url=seaweed.endpoint_url, s3_bucket=BUCKET)


def test_s3_round_trip(seaweed, s3_settings):
    transcript = _transcript(50)
    job = _job()
    uid = job["metadata"]["uid"]
    ref = stores.store_result(transcript, job, s3_settings)

    key = f"results/team-a/meeting-42/{uid}.json.gz"
    assert ref["ref"] == f"s3://{BUCKET}/{key}"
    obj = seaweed.client().get_object(Bucket=BUCKET, Key=key)
    stored = obj["Body"].read()
    _check_ref(ref, stored, "s3")
    assert obj["ContentLength"] == ref["sizeBytes"] and obj["Metadata"]["sha256"] == ref["sha256"]
    assert json.loads(gzip.decompress(stored))["segments"][1]["words"][0]["text"] == " word1_0"

    assert stores.load_result(ref, "team-a", settings=s3_settings) == transcript
    # A retried runner overwrites with identical bytes.
    assert stores.store_result(transcript, job, s3_settings) == ref

    assert stores.delete_result(ref, "team-a", settings=s3_settings)
    with pytest.raises(stores.ResultNotFound, match="not found"):
        stores.load_result(ref, "team-a", settings=s3_settings)


def test_s3_detects_a_replaced_object(seaweed, s3_settings):
    ref = stores.store_result(_transcript(), _job(name="tampered"), s3_settings)
    bucket, key = stores.parse_s3_ref(ref["ref"])
    seaweed.client().put_object(Bucket=bucket, Key=key, Body=stores.encode(_transcript(4)))
    with pytest.raises(ResultStoreFailed, match="sha256"):
        stores.load_result(ref, "team-a", settings=s3_settings)


def test_s3_misconfiguration_is_a_clear_error(seaweed, s3_settings):
    s3_settings.s3_bucket = None
    with pytest.raises(ResultStoreFailed, match="IFW_S3_BUCKET"):
        stores.store_result(_transcript(), _job(), s3_settings)
    s3_settings.s3_bucket = "no-such-bucket"
    with pytest.raises(ResultStoreFailed, match=r"no-such-bucket.*\((NoSuchBucket|AccessDenied)\)") as info:
        stores.store_result(_transcript(), _job(), s3_settings)
    assert info.value.exit_code == contract.EXIT_TRANSIENT


# ---------------------------------------------------------------- Secret (real apiserver)


@pytest.fixture
def core_v1(kube):
    from kubernetes import client

    with kube.api_client() as api:
        yield client.CoreV1Api(api)


@pytest.fixture
def job_object(kube, tj_crd, namespace, core_v1) -> dict:
    """A real TranscriptionJob (server-assigned uid) and the empty result Secret the operator makes for it."""
    from kubernetes import client

    with kube.api_client() as api:
        job = client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL,
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": "meeting-42"},
             "spec": {"audio": {"url": "https://example.com/a.mp3"}}},
        )  # fmt: skip
    core_v1.create_namespaced_secret(namespace, stores.result_secret(job))
    return job


def test_secret_round_trip_keeps_the_operators_object(job_object, core_v1, namespace):
    transcript = _transcript(50)
    settings = ResultSettings()  # the default store: a Secret
    ref = stores.store_result(transcript, job_object, settings, core_v1=core_v1)
    assert ref["ref"] == "meeting-42-result"

    secret = core_v1.read_namespaced_secret("meeting-42-result", namespace)
    data = base64.b64decode(secret.data[stores.SECRET_KEY])
    _check_ref(ref, data, "secret")
    uid = job_object["metadata"]["uid"]
    assert secret.type == stores.SECRET_TYPE
    # The runner wrote only the data and its checksum: the operator's controller reference and
    # labels are exactly as the operator built them.
    (owner,) = secret.metadata.owner_references
    assert (owner.api_version, owner.kind, owner.name, owner.uid, owner.controller) == (
        f"{GROUP}/{VERSION}", KIND, "meeting-42", uid, True
    )
    assert secret.metadata.labels == stores.result_secret(job_object)["metadata"]["labels"]
    assert secret.metadata.labels[contract.LABEL_MANAGED_BY] == contract.MANAGED_BY_OPERATOR
    assert secret.metadata.annotations[contract.ANNOTATION_RESULT_SHA256] == ref["sha256"]

    assert stores.load_result(ref, namespace, job_uid=uid, core_v1=core_v1) == transcript

    # Retry: the same write again is fine, and so is a changed result.
    assert stores.store_result(transcript, job_object, settings, core_v1=core_v1) == ref
    shorter = _transcript(2)
    ref2 = stores.store_result(shorter, job_object, settings, core_v1=core_v1)
    assert ref2["ref"] == ref["ref"] and ref2["sha256"] != ref["sha256"]
    assert stores.load_result(ref2, namespace, job_uid=uid, core_v1=core_v1) == shorter
    with pytest.raises(ResultStoreFailed, match="sha256"):  # the old pointer no longer matches
        stores.load_result(ref, namespace, core_v1=core_v1)

    # A job recreated under the same name must not read its predecessor's result.
    with pytest.raises(stores.ResultNotFound, match="another job"):
        stores.load_result(ref2, namespace, job_uid=str(uuid.uuid4()), core_v1=core_v1)

    assert stores.delete_result(ref2, namespace, core_v1=core_v1)
    assert not stores.delete_result(ref2, namespace, core_v1=core_v1)  # already gone: fine
    with pytest.raises(stores.ResultNotFound):
        stores.load_result(ref2, namespace, core_v1=core_v1)


def test_secret_of_another_job_is_never_written(job_object, core_v1, namespace):
    namesake = {"metadata": {**job_object["metadata"], "uid": str(uuid.uuid4())}}
    with pytest.raises(ResultStoreFailed, match="belongs to another TranscriptionJob") as info:
        stores.store_result(_transcript(), namesake, ResultSettings(), core_v1=core_v1)
    assert info.value.exit_code == contract.EXIT_TRANSIENT
    assert not core_v1.read_namespaced_secret("meeting-42-result", namespace).data


def test_secret_over_the_cap_points_at_s3(job_object, core_v1, namespace):
    settings = ResultSettings(result_secret_max_bytes=1024)
    with pytest.raises(ResultTooLarge, match="S3 result store") as info:
        stores.store_result(_transcript(200), job_object, settings, core_v1=core_v1)
    assert info.value.exit_code == contract.EXIT_BAD_INPUT
    assert not core_v1.read_namespaced_secret("meeting-42-result", namespace).data


def test_secret_store_needs_the_operators_secret(kube, core_v1, namespace):
    # No pre-created Secret (no operator, or the job is gone): a clear, transient error.
    with pytest.raises(ResultStoreFailed, match="the operator creates it") as info:
        stores.store_result(_transcript(), _job(namespace=namespace), ResultSettings(), core_v1=core_v1)
    assert info.value.exit_code == contract.EXIT_TRANSIENT
