"""README's main command works: the local stack transcribes its spoken sample end to end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import jiwer
import pytest
from kubernetes import client

from ifw.crds.transcriptionjob import GROUP, PLURAL, VERSION
from ifw.local.control_plane import ControlPlane
from ifw.local.stack import SAMPLE_TEXT, LocalStack, control_plane_client
from tests.cluster.origin import Origin
from tests.speaking import speak
from tests.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.model]

REPO = Path(__file__).resolve().parents[2]


def test_local_stack_demo_transcribes_the_sample_through_rest():
    result = subprocess.run(
        [str(Path(sys.executable).with_name("ifw")), "local"],  # exactly what `make demo` runs
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "-> HTTP 200" in out and '"status": "completed"' in out
    heard = re.sub(r"[^a-z' ]", "", re.findall(r'"text": "([^"]*)"', out)[0].lower())
    for word in ("fast", "kubernetes", "transcription", "resource", "apply", "delete"):
        assert word in heard, heard
    # kubectl shows the finished job with its columns filled in by operator and runner.
    row = next(line for line in out.splitlines() if "Succeeded" in line)
    assert " en " in row and " base " in row
    assert jiwer.wer(re.sub(r"[^a-z' ]", "", SAMPLE_TEXT.lower()), heard) <= 0.25, heard


def test_a_pool_worker_slower_than_ready_timeout_stops_the_stack_and_says_what_to_raise():
    # base takes seconds to load here, so half a second is too short: the stack must give up with a
    # message naming the flag, and leave no process behind.
    result = subprocess.run(
        [str(Path(sys.executable).with_name("ifw")), "local", "--ready-timeout", "0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "pool worker not ready" in result.stderr and "within 0.5s" in result.stderr, result.stderr[-2000:]
    assert "--ready-timeout" in result.stderr
    logs = re.search(r"logs kept in (\S+)", result.stderr).group(1)
    assert not _processes_in(logs), "processes of the failed stack still running"


def _processes_in(directory: str) -> list[str]:
    """PIDs whose working directory is under `directory` (the stack starts each process there)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "cwd").startswith(directory):
                found.append(proc.name)
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def test_with_a_state_dir_results_and_unfinished_jobs_survive_a_crash_of_the_whole_machine(tmp_path, monkeypatch):
    """`ifw local --state-dir`: every process of the stack is SIGKILLed (a power cut) with one job
    running in the pool worker and an uploaded one queued behind it; started again on the same
    directory, the finished task still answers, and both unfinished ones complete."""
    monkeypatch.setenv("IFW_WORKER_CAPACITY", "1")  # the upload queues behind the running job
    state = tmp_path / "state"
    speech = speak("Please call me tomorrow morning.", tmp_path / "speech.wav").read_bytes()
    upload = {"file": ("speech.wav", speech, "audio/wav")}

    def started(work: Path, cp: ControlPlane) -> LocalStack:
        work.mkdir()
        stack = LocalStack(work, "tiny.en", state_dir=state, webhook_allowlist=["127.0.0.1"])
        stack.start(cp)
        return stack

    with Origin(audio=speech) as origin:
        hook = json.dumps({"url": f"{origin.base}/hook"})
        with ControlPlane(etcd_data_dir=state / "etcd") as cp:
            stack = started(tmp_path / "first", cp)
            try:
                http = httpx.Client(base_url=stack.gateway_url, timeout=300)
                done = http.post("/", data={"managed_task_id": "Meeting_A"}, files=upload)
                assert done.status_code == 200, done.text
                held = http.post("/", json={"url": f"{origin.base}/slow.wav", "is_async": True,
                                            "managed_task_id": "held", "webhook": {"url": f"{origin.base}/hook"}})
                assert held.status_code == 200, held.text
                assert origin.fetching.wait(60), "the worker never fetched the held audio"
                queued = http.post("/", data={"is_async": "true", "managed_task_id": "queued", "webhook": hook},
                                   files=upload)  # fmt: skip
                assert queued.status_code == 200, queued.text
                custom = client.CustomObjectsApi(control_plane_client(cp.kubeconfig))

                def phase_of(task: str) -> str | None:  # a task id that is an object name is the job's name
                    tj = custom.get_namespaced_custom_object(GROUP, VERSION, stack.namespace, PLURAL, task)
                    return (tj.get("status") or {}).get("phase")

                wait_for(lambda: phase_of("queued") == "Queued", 30, "the upload queued behind the held job")
                wait_for(lambda: phase_of("held") == "Running", 30, "the held job running")
                gateway_url = stack.gateway_url
            finally:  # a power cut: every process at once, nothing told
                _crash(stack, cp)
        origin.release.set()  # the held request of the dead worker ends
        origin.slow_serves_audio = True  # the held audio answers from now on

        with ControlPlane(etcd_data_dir=state / "etcd") as cp:
            stack = started(tmp_path / "second", cp)
            try:
                assert stack.gateway_url == gateway_url  # the port the queued upload's URL names
                http = httpx.Client(base_url=stack.gateway_url, timeout=300)
                kept = http.get("/status/Meeting_A").json()
                assert kept["status"] == "completed" and kept["output"] == done.json()["output"], kept
                for task in ("held", "queued"):
                    finished = wait_for(lambda task=task: (lambda s: s if s["status"] in ("completed", "error") else
                                                           None)(http.get(f"/status/{task}").json()),
                                        180, f"{task} to finish", interval=0.5)  # fmt: skip
                    assert finished["status"] == "completed", finished
                    assert "call me" in finished["output"]["text"].lower(), finished
                # The running job's lost attempt was counted and retried (WorkerRestarted, or WorkerLost
                # when the restart outlasts the worker's Lease); the queued one ran once.
                custom = client.CustomObjectsApi(control_plane_client(cp.kubeconfig))
                assignment = {task: custom.get_namespaced_custom_object(GROUP, VERSION, stack.namespace, PLURAL,
                                                                        task)["status"]["assignment"]
                              for task in ("held", "queued")}  # fmt: skip
                # (attempts beyond the retry are hand-backs of a full worker: capacity 1 here)
                assert assignment["held"]["retries"] == 1 and assignment["held"]["attempt"] >= 2, assignment
                assert assignment["queued"]["retries"] == 0, assignment
            finally:
                stack.stop()


def _crash(stack: LocalStack, cp: ControlPlane) -> None:
    stack.stop_supervising()  # the supervisor goes down with the machine too: nothing is restarted
    for process in stack.processes:
        process.kill()
    stack.node.stop()  # its runner processes (none in pool mode) go with the machine
    for pid in cp.pids:
        os.kill(pid, signal.SIGKILL)
    for process in stack.processes:
        process.wait()
