"""Deletion against the real apiserver: the finalizer holds a job until what its deletion owes is done
(the runner stopped, the cancelled webhook, an S3 result removed), and only ifw's finalizer goes."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from ifw.core import results
from ifw.core.transcript import Segment, Transcript
from ifw.operator.objectmeta import FINALIZER
from tests.operator.conftest import FAST, SECRET, free_port, wait_for, wait_reconciled

pytestmark = pytest.mark.cluster
README = Path(__file__).resolve().parents[2] / "operator" / "README.md"


def _finalizers(sim, name: str) -> list[str] | None:
    tj = sim.tj(name)
    return None if tj is None else tj["metadata"].get("finalizers") or []


def _held(sim, name: str):
    """The job as it waits for its finalizers: deleted, still there."""
    tj = sim.tj(name)
    return tj if tj and tj["metadata"].get("deletionTimestamp") else None


def test_a_cancelled_job_stops_at_once_sends_cancelled_once_then_goes(run_operator, sim, receiver):
    import threading

    release = threading.Event()
    hook = receiver(hold=release)
    run_operator(**FAST)
    tj = sim.create_tj("cancel-me", webhook={"url": hook.url})
    uid = tj["metadata"]["uid"]
    wait_for(lambda: _finalizers(sim, "cancel-me") == [FINALIZER], 10, what="the finalizer")
    job = sim.job_of(tj)
    sim.pod_running(sim.create_pod(job))
    sim.wait_phase("cancel-me", "Running")

    sim.delete_tj("cancel-me")
    wait_for(hook.arrived.is_set, 10, what="the cancelled webhook")
    # While the receiver holds it: the runner is already gone, the job waits on its finalizer.
    assert not sim.jobs(uid) and not sim.pods(uid)
    assert _held(sim, "cancel-me")
    release.set()
    wait_for(lambda: sim.tj("cancel-me") is None, 10, what="the job gone once the webhook was delivered")
    (request,) = hook.requests
    payload = Webhook(SECRET).verify(request["body"], request["headers"])
    assert payload == {"error": "Task Cancelled", "status": "cancelled", "task_id": "cancel-me",
                       "processed_by": {"runtime": "Job"}}
    assert request["headers"]["webhook-id"] == f"{uid}-cancelled"
    sel = f"ifw.dev/job-uid={uid}"
    assert sim.core.list_namespaced_secret(sim.ns, label_selector=sel).items == []


def test_a_receiver_that_stays_down_does_not_block_the_deletion(run_operator, sim, recorder):
    run_operator(webhook={**FAST["webhook"], "max_attempts": 3})
    nobody = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    sim.create_tj("unheard", webhook={"url": nobody})
    wait_for(lambda: _finalizers(sim, "unheard") == [FINALIZER], 10, what="the finalizer")
    sim.delete_tj("unheard")
    wait_for(lambda: sim.tj("unheard") is None, 15, what="the deletion, after the attempts ran out")
    wait_for(lambda: recorder.saw_deleted("unheard"), 10, what="the recorder to see the deletion")  # it can lag a GET
    last = recorder.versions("unheard")[-1]["status"]["webhook"]
    assert (last["attempts"], last["delivered"]) == (3, False) and "ConnectError" in last["lastError"]


def test_an_s3_result_goes_even_when_its_job_was_deleted_while_the_operator_was_down(run_operator, sim, monkeypatch):
    from tests.core.s3server import SeaweedS3

    with SeaweedS3() as s3:
        s3.create_bucket("results")
        for key, value in {"IFW_RESULT_STORE": "s3", "IFW_S3_BUCKET": "results", "IFW_S3_ENDPOINT_URL": s3.endpoint_url,
                           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}.items():
            monkeypatch.setenv(key, value)
        op = run_operator()
        tj = sim.create_tj("in-s3")
        wait_for(lambda: _finalizers(sim, "in-s3") == [FINALIZER], 10, what="the finalizer (an S3 store)")
        job = sim.job_of(tj)
        op.stop()

        # With the operator down: the runner stores its result, the job finishes and is deleted.
        transcript = Transcript(text=" hi", segments=[Segment(start=0, end=1, text=" hi")])
        ref = results.store_result(transcript, tj, results.ResultSettings())
        sim.patch_tj_status("in-s3", {"result": ref})
        sim.set_job_condition(job, "Complete", "CompletionsReached")
        sim.delete_tj("in-s3")
        assert _held(sim, "in-s3")  # not gone: nobody has deleted the S3 object yet
        bucket, _ = results.parse_s3_ref(ref["ref"])
        assert s3.client().list_objects_v2(Bucket=bucket).get("Contents")

        run_operator()
        wait_for(lambda: sim.tj("in-s3") is None, 15, what="the job gone")
        assert not s3.client().list_objects_v2(Bucket=bucket).get("Contents"), "the S3 result leaked"


def test_only_ifws_finalizer_is_removed(run_operator, sim, receiver):
    hook = receiver()
    op = run_operator(**FAST)
    tj = sim.create_tj("shared", webhook={"url": hook.url})
    wait_for(lambda: _finalizers(sim, "shared") == [FINALIZER], 10, what="the finalizer")
    # Another tool's, before and after ours.
    sim.patch_tj("shared", {"metadata": {"finalizers": ["example.com/first", FINALIZER, "example.com/last"]}})
    sim.delete_tj("shared")
    wait_for(lambda: _finalizers(sim, "shared") == ["example.com/first", "example.com/last"], 10,
             what="only ifw's finalizer removed")
    assert [r["headers"]["webhook-id"] for r in hook.requests] == [f"{tj['metadata']['uid']}-cancelled"]
    wait_reconciled(op, tj["metadata"]["uid"])
    assert len(hook.requests) == 1 and _held(sim, "shared")
    sim.patch_tj("shared", {"metadata": {"finalizers": None}})
    wait_for(lambda: sim.tj("shared") is None, 10, what="gone once the other tool let go")


def test_the_finalizer_can_be_removed_by_hand_as_the_readme_says(run_operator, sim, kube):
    op = run_operator(**FAST)
    sim.create_tj("orphan", webhook={"url": "https://hooks.example.com/x"})
    wait_for(lambda: _finalizers(sim, "orphan") == [FINALIZER], 10, what="the finalizer")
    op.stop()  # the operator is gone (uninstalled, broken): the deletion hangs on its finalizer
    sim.delete_tj("orphan")
    assert _held(sim, "orphan")
    (command,) = re.findall(r"^\s*(kubectl patch tj NAME .+)$", README.read_text(), re.MULTILINE)
    args = ["orphan" if arg == "NAME" else arg for arg in shlex.split(command)[1:]]
    kube.kubectl("-n", sim.ns, *args)
    wait_for(lambda: sim.tj("orphan") is None, 10, what="the job gone")
