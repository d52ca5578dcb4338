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


def test_a_sharded_job_counts_as_its_shards_against_the_cap(run_operator, sim):
    """Cap 4: a 3-shard job and one single job fill it (3 GPUs + 1). Counted once, the shard job left
    two slots free and a second single job started beside them: five runner pods on four GPUs."""
    op = run_operator(max_active_jobs=4)
    wide = sim.create_tj("wide", parallelism=3)
    assert is_sharded(sim.job_of(wide))
    one = sim.create_tj("one")
    first = sim.job_of(one)
    two = sim.create_tj("two")
    status = sim.wait_phase("two", "Queued", "ConcurrencyLimit")
    assert "4/4 runner jobs active cluster-wide" in status["message"], status["message"]
    wait_reconciled(op, two["metadata"]["uid"])
    assert not sim.jobs(two["metadata"]["uid"])
    # A wider job behind it waits for room for all of its shards, and keeps its place in line.
    sim.create_tj("wide2", parallelism=2)
    status = sim.wait_phase("wide2", "Queued", "ConcurrencyLimit")
    assert "this job needs 2 (one per shard)" in status["message"], status["message"]

    # The single job ends: one slot frees, and the oldest waiting job (one slot) takes it.
    sim.set_job_condition(first, "Complete", "CompletionsReached")
    sim.job_of(two)
    wait_reconciled(op, wide["metadata"]["uid"])
    assert not sim.jobs(sim.tj("wide2")["metadata"]["uid"])  # 3 + 1 of 4: no room for two shards yet
    # The shard job ends: its three slots free, and the 2-shard job starts.
    wide_job = sim.jobs(wide["metadata"]["uid"])[0]
    for i in range(3):
        shards.store_partial(sim.core, wide, _partial(i, 3, f" part {i}."))
    sim.set_job_condition(wide_job, "Complete", "CompletionsReached", succeeded=3, completedIndexes="0-2")
    sim.wait_phase("wide", "Succeeded")
    assert is_sharded(sim.job_of(sim.tj("wide2")))


def test_an_auto_job_handed_back_under_a_cap_waits_for_room_for_its_shards(run_operator, sim):
    """Cap 2, both taken (the Auto job's single runner and another job). The runner asks for 3 shards:
    the Indexed Job is created suspended and the job waits; wider than the cap, it runs once alone."""
    op = run_operator(max_active_jobs=2, sharding={"auto_above_seconds": 60, "min_shard_seconds": 40, "max_shards": 4})
    tj = sim.create_tj("auto", parallelism="Auto")
    uid = tj["metadata"]["uid"]
    single = sim.job_of(tj)
    other = sim.job_of(sim.create_tj("other"))
    pod = sim.create_pod(single)
    sim.pod_running(pod)
    sim.patch_tj_status("auto", {"shards": {"count": 3}})
    try:
        sim.pod_terminated(pod, 0, reason="Completed")
        sim.set_job_condition(single, "Complete", "CompletionsReached")
    except ApiException as error:
        assert error.status == 404
    sharded = wait_for(lambda: [j for j in sim.jobs(uid) if is_sharded(j)], 10, what="the Indexed Job")[0]
    assert sharded["spec"]["suspend"] is True  # 3 shards beside a running job would make 4 pods on 2
    status = sim.wait_phase("auto", "Queued", "ConcurrencyLimit")
    assert "this job needs 3 (one per shard)" in status["message"], status["message"]
    wait_reconciled(op, uid)
    assert sim.read_job(sharded["metadata"]["name"])["spec"]["suspend"] is True
    # The other job ends: alone now, the 3-shard job runs although it is wider than the cap.
    sim.set_job_condition(other, "Complete", "CompletionsReached")
    wait_for(lambda: sim.read_job(sharded["metadata"]["name"])["spec"]["suspend"] is False, 10,
             what="the Indexed Job resumed")  # fmt: skip
    wait_for(lambda: sim.status("auto").get("phase") == "Pending", 10, what="the job admitted (Pending: no pod yet)")


def _shard_says(sim, name: str, index: int, state: str, text: str, *, cut: bool = False) -> None:
    """What a streaming shard's runner writes into its own item (runner/execute.py transcribe_shard)."""
    done = state == "Succeeded"
    item = {"state": state, "processedSeconds": 100.0 if done else 50.0, "totalSeconds": 100.0, "text": text,
            "textCut": cut}  # fmt: skip
    sim.patch_tj_status(name, {"shards": {"items": {str(index): item}},
                               **({"audio": {"durationSeconds": 300.0}} if done else {})})  # fmt: skip


def _progress_text(sim, name: str) -> str | None:
    return (sim.status(name).get("progress") or {}).get("text")


def test_a_streaming_sharded_job_shows_its_text_in_time_order(run_operator, sim, recorder):
    """The shards report out of order; status.progress.text only ever grows at its end: shard i's text
    shows once shards 0..i-1 finished, and the merged transcript's text starts with all of it."""
    op = run_operator()
    tj = sim.create_tj("live", parallelism=3)
    uid = tj["metadata"]["uid"]
    sim.patch_tj("live", {"metadata": {"annotations": {"ifw.dev/stream": "true"}}})
    job = sim.job_of(tj)
    pods = [_shard_pod(sim, job, i) for i in range(3)]
    for pod in pods:
        sim.pod_running(pod)
    sim.wait_phase("live", "Running")

    # The later shards are first: nothing of theirs may show before shard 0's text.
    _shard_says(sim, "live", 2, "Succeeded", " c1 c2.")
    _shard_says(sim, "live", 1, "Running", " b1")
    wait_for(lambda: (sim.status("live").get("progress") or {}).get("percent") == 50.0 or None, 10,
             what="progress summed")  # fmt: skip
    wait_reconciled(op, uid)
    assert not _progress_text(sim, "live")
    # Shard 0 runs: its text so far shows, and grows; shard 1's waits for shard 0 to finish.
    _shard_says(sim, "live", 0, "Running", " a1")
    wait_for(lambda: _progress_text(sim, "live") == " a1", 10, what="shard 0's text")
    _shard_says(sim, "live", 1, "Running", " b1 b2")
    _shard_says(sim, "live", 0, "Running", " a1 a2")
    wait_for(lambda: _progress_text(sim, "live") == " a1 a2", 10, what="shard 0's text grown")
    wait_reconciled(op, uid)
    assert _progress_text(sim, "live") == " a1 a2"
    # Shard 0 done: shard 1's text so far follows it; shard 2 (done long ago) waits for shard 1.
    _shard_says(sim, "live", 0, "Succeeded", " a1 a2 a3.")
    wait_for(lambda: _progress_text(sim, "live") == " a1 a2 a3. b1 b2", 10, what="shard 1's text after shard 0's")
    # A retried shard 1 starts over: the shown text is not taken back (a delta never is).
    _shard_says(sim, "live", 1, "Running", " b1")
    wait_reconciled(op, uid)
    assert _progress_text(sim, "live") == " a1 a2 a3. b1 b2"
    _shard_says(sim, "live", 1, "Succeeded", " b1 b2 b3.")
    wait_for(lambda: _progress_text(sim, "live") == " a1 a2 a3. b1 b2 b3. c1 c2.", 10, what="all three in order")

    texts = [" a1 a2 a3.", " b1 b2 b3.", " c1 c2."]
    for i, pod in enumerate(pods):
        shards.store_partial(sim.core, tj, _partial(i, 3, texts[i]))
        sim.pod_terminated(pod, 0, reason="Completed")
    sim.set_job_condition(job, "Complete", "CompletionsReached", succeeded=3, completedIndexes="0-2")
    status = sim.wait_phase("live", "Succeeded")
    merged = results.load_result(status["result"], sim.ns, job_uid=uid, core_v1=sim.core)
    assert status["progress"]["text"] == merged.text == "".join(texts)

    # Every text any watcher saw was the start of the next one, and of the final text.
    recorder.phases_through("live", "Succeeded")
    seen = [t for v in recorder.versions("live") if (t := ((v.get("status") or {}).get("progress") or {}).get("text"))]
    assert seen and seen[-1] == merged.text
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:])), seen
    assert [t for i, t in enumerate(seen) if i == 0 or t != seen[i - 1]] == [
        " a1", " a1 a2", " a1 a2 a3. b1 b2", " a1 a2 a3. b1 b2 b3. c1 c2."
    ]


def test_a_shard_text_cut_to_its_share_holds_back_the_shards_after_it(run_operator, sim):
    op = run_operator()
    tj = sim.create_tj("cut", parallelism=2)
    uid = tj["metadata"]["uid"]
    sim.patch_tj("cut", {"metadata": {"annotations": {"ifw.dev/stream": "true"}}})
    job = sim.job_of(tj)
    for i in range(2):
        sim.pod_running(_shard_pod(sim, job, i))
    _shard_says(sim, "cut", 1, "Succeeded", " later.")
    _shard_says(sim, "cut", 0, "Succeeded", " the first 8192 characters", cut=True)
    wait_for(lambda: _progress_text(sim, "cut") == " the first 8192 characters", 10, what="shard 0's text")
    wait_reconciled(op, uid)
    assert _progress_text(sim, "cut") == " the first 8192 characters"  # " later." is not what follows it


def test_shard_runners_stream_their_text_through_the_operator_in_order(run_operator, sim, monkeypatch):
    """Each shard's real runner code (ifw.runner.job.run_job, its Attempt, its status writes) against
    the apiserver, the decode played by a stand-in for run_shard: the last shard finishes first, and
    the job's text still starts with the first shard's."""
    from ifw.runner import job as runner_job
    from ifw.runner import shard as runner_shard
    from ifw.runner.config import RunnerSettings

    op = run_operator()
    tj = sim.create_tj("runners", parallelism=2)
    uid = tj["metadata"]["uid"]
    sim.patch_tj("runners", {"metadata": {"annotations": {"ifw.dev/stream": "true"}}})
    sim.job_of(tj)
    finals = [" a1 a2 a3.", " b1 b2."]

    def stand_in(spec, source, index, count, settings, on_progress=None, on_text=None, **_):
        for step, text in enumerate(finals[index].split(" ")[1:], start=1):
            assert on_text is not None  # a streaming job's shard streams
            on_text(" " + " ".join(finals[index].split(" ")[1 : step + 1]))
            on_progress(40.0 * step, 100.0)
            if index == 0 and step == 1:  # shard 1 finished long ago: only shard 0's start shows
                wait_for(lambda: _progress_text(sim, "runners") == " a1", 10, what="shard 0's first words")
        return _partial(index, count, finals[index])

    monkeypatch.setattr(runner_shard, "run_shard", stand_in)

    def run(index: int) -> int:
        settings = RunnerSettings(job_namespace=sim.ns, job_name="runners", job_uid=uid, IFW_SHARD_INDEX=index,
                                  shard_count=2, progress_interval_seconds=0.001, pod_name=f"runners-{index}")  # fmt: skip
        return runner_job.run_job(settings, sim.api_client)

    assert run(1) == 0
    item = sim.status("runners")["shards"]["items"]["1"]
    assert (item["state"], item["text"], item["textCut"]) == ("Succeeded", " b1 b2.", False)
    wait_reconciled(op, uid)
    assert not _progress_text(sim, "runners")
    assert run(0) == 0
    wait_for(lambda: _progress_text(sim, "runners") == " a1 a2 a3. b1 b2.", 10, what="both shards' text, in order")


def test_a_shard_that_succeeded_frees_its_slot_before_the_job_ends(run_operator, sim):
    op = run_operator(max_active_jobs=3)
    wide = sim.create_tj("wide", parallelism=3)
    job = sim.job_of(wide)
    waiting = sim.create_tj("waiting")
    sim.wait_phase("waiting", "Queued", "ConcurrencyLimit")
    wait_reconciled(op, waiting["metadata"]["uid"])
    # The Job controller counts the shards that ended well; the Job is not Complete yet.
    sim.batch.patch_namespaced_job_status(job["metadata"]["name"], sim.ns, {"status": {"succeeded": 1}})
    sim.job_of(waiting)
    assert sim.status("wide").get("phase") not in ("Succeeded", "Failed")
