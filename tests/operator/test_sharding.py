"""A sharded TranscriptionJob (spec.parallelism) against the real kube-apiserver: one Indexed Job,
the shards' reports summed, the partial results merged once, failures and cancel."""

from __future__ import annotations

import pytest
from kubernetes.client.exceptions import ApiException

from ifw.core import results, shards
from ifw.core.contract import LABEL_JOB_UID
from ifw.core.transcript import ProcessedBy, Segment, Transcript
from ifw.operator.jobs import is_sharded
from tests.operator.conftest import FAST, wait_for, wait_reconciled

pytestmark = pytest.mark.cluster

INDEX = "batch.kubernetes.io/job-completion-index"


def _partial(index: int, count: int, text: str, *, length: float = 100.0) -> shards.PartialResult:
    start, end = index * length, (index + 1) * length
    transcript = Transcript(text=text, segments=[Segment(start=start + 1, end=start + 5, text=text)], language="en",
                            duration=length * count, speech_seconds=4.0, text_seconds=4.0,
                            processed_by=ProcessedBy(pod=f"shard-{index}", node="node-a", runtime="Job"))  # fmt: skip
    return shards.PartialResult(index=index, count=count, start=start, end=end, duration=length * count,
                                transcript=transcript)  # fmt: skip


def _shard_pod(sim, job: dict, index: int) -> dict:
    pod = sim.create_pod(job, suffix=f"{index}-x")
    sim.core.patch_namespaced_pod(pod["metadata"]["name"], sim.ns, {"metadata": {"labels": {INDEX: str(index)}}})
    return pod


def _secrets(sim, uid: str) -> list[str]:
    items = sim.core.list_namespaced_secret(sim.ns, label_selector=f"{LABEL_JOB_UID}={uid}").items
    return sorted(s.metadata.name for s in items)


def test_parallelism_three_runs_one_indexed_job_and_merges_once(run_operator, sim, receiver):
    hook = receiver()
    op = run_operator(**FAST)
    tj = sim.create_tj("long", parallelism=3, backoffLimit=1, webhook={"url": hook.url})
    job = sim.job_of(tj)
    uid = tj["metadata"]["uid"]
    spec = job["spec"]
    assert is_sharded(job) and job["metadata"]["name"].endswith("-sh")
    assert (spec["completions"], spec["parallelism"], spec["backoffLimitPerIndex"], spec["maxFailedIndexes"]) == (
        3,
        3,
        1,
        0,
    )
    assert "backoffLimit" not in spec  # per index instead
    assert {"action": "FailJob", "onExitCodes": {"containerName": "runner", "operator": "In", "values": [2]}} in spec[
        "podFailurePolicy"
    ]["rules"]
    env = {e["name"]: e.get("value") for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert env["IFW_SHARD_COUNT"] == "3"
    # The operator made each shard's partial Secret (the runners may only get and patch them, by name).
    assert _secrets(sim, uid) == sorted(["long-result", *(shards.partial_secret_name("long", i) for i in range(3))])
    role = sim.rbac.read_namespaced_role("long-runner", sim.ns)
    (secret_rule,) = [r for r in role.rules if r.resources == ["secrets"]]
    assert sorted(secret_rule.resource_names) == sorted(["long-result", *(shards.partial_secret_name("long", i)
                                                                          for i in range(3))])  # fmt: skip
    assert sim.status("long").get("shards", {}).get("count") == 3 or wait_for(
        lambda: (sim.status("long").get("shards") or {}).get("count") == 3, 10, what="status.shards.count"
    )

    pods = [_shard_pod(sim, job, i) for i in range(3)]
    for pod in pods:
        sim.pod_running(pod)
    sim.wait_phase("long", "Running")
    # Each shard reports in its own key; the operator sums them into status.progress.
    for i in range(3):
        sim.patch_tj_status("long", {"shards": {"items": {str(i): {"state": "Running", "processedSeconds": 50.0,
                                                                   "totalSeconds": 100.0}}}})  # fmt: skip
    status = wait_for(
        lambda: (lambda s: s if (s.get("progress") or {}).get("percent") == 50.0 else None)(sim.status("long")),
        10,
        what="progress summed over the shards",
    )
    assert status["progress"]["processedSeconds"] == 150.0 and status["progress"]["totalSeconds"] == 300.0
    assert len(status["shards"]["items"]) == 3  # the shards' concurrent merge patches kept each other's keys
    assert status["message"].startswith("3 of 3 shards running")

    # Every shard stores its partial result and finishes; the Job controller marks the Job Complete.
    for i, pod in enumerate(pods):
        shards.store_partial(sim.core, tj, _partial(i, 3, f" part {i}."))
        sim.patch_tj_status("long", {"shards": {"items": {str(i): {"state": "Succeeded", "processedSeconds": 100.0,
                                                                   "totalSeconds": 100.0}}}})  # fmt: skip
        sim.pod_terminated(pod, 0, reason="Completed")
    sim.set_job_condition(job, "Complete", "CompletionsReached", succeeded=3, completedIndexes="0-2")
    status = sim.wait_phase("long", "Succeeded")
    assert status["shards"]["count"] == 3 and status["shards"]["succeeded"] == 3
    assert status["progress"]["percent"] == 100.0 and status["audio"]["durationSeconds"] == 300.0
    assert status["audio"]["speechSeconds"] == 12.0
    merged = results.load_result(status["result"], sim.ns, job_uid=uid, core_v1=sim.core)
    assert merged.text == " part 0. part 1. part 2."
    assert [s.start for s in merged.segments] == [1.0, 101.0, 201.0]  # on the file's clock, in time order
    assert [r.pod for r in merged.processed_by.runners] == ["shard-0", "shard-1", "shard-2"]
    # The partials served their purpose; the result stays.
    wait_for(lambda: _secrets(sim, uid) == ["long-result"], 10, what=f"partials deleted (left: {_secrets(sim, uid)})")
    # One webhook for the job, with the merged transcript; nothing merged or sent again.
    wait_for(lambda: (sim.status("long").get("webhook") or {}).get("delivered"), 10, what="the webhook delivered")
    wait_reconciled(op, uid)
    assert len(hook.requests) == 1 and b"part 1." in hook.requests[0]["body"]
    assert sim.status("long")["result"] == status["result"]


def test_a_shard_with_bad_input_fails_the_job_with_its_reason(run_operator, sim):
    run_operator()
    tj = sim.create_tj("bad", parallelism=2)
    job = sim.job_of(tj)
    first, second = _shard_pod(sim, job, 0), _shard_pod(sim, job, 1)
    sim.pod_running(first)
    sim.pod_running(second)
    sim.wait_phase("bad", "Running")
    sim.pod_terminated(second, 2, message='{"reason": "InvalidAudio", "message": "damaged at 1812.0 s"}')
    sim.delete_pod(first)  # the Job controller stops the other shards of a failed Job
    sim.set_job_condition(job, "Failed", "PodFailurePolicy", failed=1)
    status = sim.wait_phase("bad", "Failed", "InvalidAudio")
    assert status["message"] == "damaged at 1812.0 s"
    assert not status.get("result")


def test_a_shard_out_of_retries_fails_the_job_naming_the_runner_reason(run_operator, sim):
    run_operator()
    tj = sim.create_tj("flaky", parallelism=2, backoffLimit=0)
    job = sim.job_of(tj)
    pod = _shard_pod(sim, job, 1)
    sim.pod_terminated(pod, 1, message='{"reason": "ResultStoreFailed", "message": "apiserver unreachable"}')
    sim.set_job_condition(job, "Failed", "MaxFailedIndexesExceeded", failed=1, failedIndexes="1")
    status = sim.wait_phase("flaky", "Failed", "ResultStoreFailed")
    assert "gave up after 1 attempts" in status["message"]


def test_cancel_deletes_the_indexed_job_its_pods_and_partials(run_operator, sim):
    run_operator()
    tj = sim.create_tj("cancel", parallelism=2)
    job = sim.job_of(tj)
    uid = tj["metadata"]["uid"]
    pods = [_shard_pod(sim, job, i) for i in range(2)]
    for pod in pods:
        sim.pod_running(pod)
    sim.wait_phase("cancel", "Running")
    sim.delete_tj("cancel")
    wait_for(
        lambda: not sim.jobs(uid) and not sim.pods(uid) and not _secrets(sim, uid),
        15,
        what="the Indexed Job, every shard's pod and the Secrets deleted",
    )


def test_an_auto_job_handed_back_by_its_runner_runs_as_shards(run_operator, sim):
    op = run_operator(sharding={"auto_above_seconds": 60, "min_shard_seconds": 40, "max_shards": 4})
    tj = sim.create_tj("auto", parallelism="Auto")
    uid = tj["metadata"]["uid"]
    single = sim.job_of(tj)
    assert not is_sharded(single)
    env = {e["name"]: e.get("value") for e in single["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["IFW_SHARD_AUTO_ABOVE_SECONDS"], env["IFW_SHARD_MIN_SECONDS"], env["IFW_SHARD_MAX_COUNT"]) == (
        "60.0",
        "40.0",
        "4",
    ) and "IFW_SHARD_COUNT" not in env
    # Its runner found 150 s of audio and asks for 3 shards, then ends well (exit 0: no retry spent).
    pod = sim.create_pod(single)
    sim.pod_running(pod)
    sim.patch_tj_status("auto", {"shards": {"count": 3}})
    try:  # (the operator may replace the Job as soon as it reads the count: then these find nothing)
        sim.pod_terminated(pod, 0, reason="Completed")
        sim.set_job_condition(single, "Complete", "CompletionsReached")
    except ApiException as error:
        assert error.status == 404
    sharded = wait_for(lambda: [j for j in sim.jobs(uid) if is_sharded(j)], 10, what="the Indexed Job")[0]
    assert sharded["spec"]["completions"] == 3
    wait_for(
        lambda: [j["metadata"]["name"] for j in sim.jobs(uid)] == [sharded["metadata"]["name"]],
        10,
        what="the single runner's Job replaced",
    )
    status = sim.status("auto")
    assert status["phase"] != "Succeeded" and status["jobName"] == sharded["metadata"]["name"]
    assert sorted(n for n in _secrets(sim, uid) if "-part-" in n) == [shards.partial_secret_name("auto", i)
                                                                       for i in range(3)]  # fmt: skip
    wait_reconciled(op, uid)
    assert sim.status("auto").get("phase") not in ("Succeeded", "Failed")
