"""Admission queue and operator settings (pure)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ifw.operator.config import OperatorSettings, get_settings
from ifw.operator.queue import AdmissionQueue


def test_cluster_cap_admits_oldest_first():
    q = AdmissionQueue(max_total=2, max_per_namespace=None)
    for i, uid in enumerate(["c", "a", "b"]):
        q.enqueue(uid, "ns", f"2026-01-01T00:00:0{i}Z")
    assert q.admit({}) == ["c", "a"]
    assert q.admit({}) == []  # the reservations count until the Jobs exist
    q.settle("c")
    assert q.admit({"c": "ns"}) == []  # ... and then the Job counts
    q.forget("c")
    assert q.admit({}) == ["b"]


def test_same_second_is_ordered_by_creation_revision_not_by_when_seen():
    q = AdmissionQueue(max_total=10, max_per_namespace=None)
    for uid, revision in [("z", 303), ("y", 301), ("x", 302)]:  # seen out of creation order
        q.enqueue(uid, "ns", "2026-01-01T00:00:00Z", revision)
    assert q.admit({}) == ["y", "x", "z"]


def test_a_settling_job_holds_back_younger_ones_so_the_line_is_never_jumped():
    q = AdmissionQueue(max_total=1, max_per_namespace=None, settle_seconds=0.2)
    second = "2026-01-01T00:00:00Z"
    q.enqueue("q03", "ns", second, 103, now=10.0)  # the younger job's worker ran first
    assert q.admit({}, now=10.1) == []  # still settling: it may not take the free slot yet
    q.enqueue("q02", "ns", second, 102, now=10.15)  # the older one shows up within the window
    assert q.held_until("q03", now=10.25) == pytest.approx(10.35)  # held by q02's settling
    assert q.admit({}, now=10.25) == []
    assert q.admit({}, now=10.4) == ["q02"]  # creation order, then the cap
    assert q.held_until("q03", now=10.4) is None


def test_no_settling_without_a_cap_or_far_from_it():
    q = AdmissionQueue(max_total=None, max_per_namespace=None, settle_seconds=0.2)
    q.enqueue("a", "ns", "2026-01-01T00:00:00Z", 1, now=10.0)
    assert q.admit({}, now=10.0) == ["a"]
    roomy = AdmissionQueue(max_total=1000, max_per_namespace=None, settle_seconds=0.2)
    roomy.enqueue("a", "ns", "2026-01-01T00:00:00Z", 1, now=10.0)
    assert roomy.admit({}, now=10.0) == ["a"]


def test_namespace_cap_does_not_block_other_namespaces():
    q = AdmissionQueue(max_total=10, max_per_namespace=1)
    q.enqueue("a1", "a", "2026-01-01T00:00:00Z")
    q.enqueue("a2", "a", "2026-01-01T00:00:01Z")
    q.enqueue("b1", "b", "2026-01-01T00:00:02Z")
    assert q.admit({}) == ["a1", "b1"]
    assert len(q) == 1 and not q.is_reserved("a2")  # a2 waits behind its own namespace's cap
    assert "1/1 in namespace a" in q.describe({"a1": "a", "b1": "b"}, "a")


def test_cluster_cap_counts_running_jobs():
    q = AdmissionQueue(max_total=3, max_per_namespace=None)
    q.enqueue("new", "ns", "2026-01-01T00:00:00Z")
    assert q.admit({"r1": "x", "r2": "y", "r3": "z"}) == []
    assert q.admit({"r1": "x", "r2": "y"}) == ["new"]


def test_no_cap():
    q = AdmissionQueue(max_total=None, max_per_namespace=None)
    for i in range(100):
        q.enqueue(str(i), "ns", "t")
    assert len(q.admit({str(-i): "ns" for i in range(1000)})) == 100


def test_settings_from_yaml_file_with_env_override(tmp_path, monkeypatch):
    path = tmp_path / "operator.yaml"
    path.write_text(
        "max_active_jobs: 4\n"
        "runner:\n"
        "  image: example.com/runner:9\n"
        "  tolerations: [{key: gpu, operator: Exists}]\n"
        "  resources: {limits: {nvidia.com/gpu: '1'}}\n"
    )
    monkeypatch.setenv("IFW_OPERATOR_CONFIG_FILE", str(path))
    monkeypatch.setenv("IFW_OPERATOR_MAX_ACTIVE_JOBS", "6")
    monkeypatch.setenv("IFW_OPERATOR_RUNNER__IMAGE_PULL_POLICY", "Always")
    monkeypatch.setenv("IFW_OPERATOR_WEBHOOK__SIGNING_SECRET", "whsec_c2VjcmV0")
    s = OperatorSettings()
    assert s.max_active_jobs == 6  # env beats the file
    assert s.runner.image == "example.com/runner:9" and s.runner.image_pull_policy == "Always"
    assert s.runner.tolerations == [{"key": "gpu", "operator": "Exists"}]
    assert s.webhook.signing_secret.get_secret_value() == "whsec_c2VjcmV0"
    assert "whsec" not in repr(s)


def test_settings_refuse_unknown_keys_and_missing_file(tmp_path, monkeypatch):
    path = tmp_path / "operator.yaml"
    path.write_text("max_active_job: 4\n")  # typo
    monkeypatch.setenv("IFW_OPERATOR_CONFIG_FILE", str(path))
    with pytest.raises(ValidationError, match="max_active_job"):
        OperatorSettings()
    monkeypatch.setenv("IFW_OPERATOR_CONFIG_FILE", str(tmp_path / "absent.yaml"))
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        OperatorSettings()


def test_default_settings_are_secure_and_gpu_ready(monkeypatch):
    monkeypatch.delenv("IFW_OPERATOR_CONFIG_FILE", raising=False)
    get_settings.cache_clear()
    s = get_settings()
    assert s.runner.resources["limits"]["nvidia.com/gpu"] == "1"
    assert s.runner.security_context["readOnlyRootFilesystem"] is True
    assert s.max_active_jobs == 8 and s.default_ttl_seconds_after_finished == 86400
    assert s.watch_client_timeout_seconds > s.watch_server_timeout_seconds
    get_settings.cache_clear()
