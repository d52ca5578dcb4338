"""`ifw local` supervises what it starts and leaves nothing behind.

- a SIGKILLed operator and pool worker are started again (logged) and a job still completes;
- SIGTERM, SIGINT (`docker stop`: the standalone image's STOPSIGNAL) and SIGKILL of `ifw local`
  end every process it started: etcd, the apiserver, the operator, the gateway, the worker.
  The processes are found by a marker in their environment, which each one inherits;
- the --allow-*-host flags reach the runner, the gateway and the operator.
"""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import pytest

from tests.cluster.running import child_pid, ends_with_nothing_left, marked, start_local
from tests.speaking import speak
from tests.waiting import wait_for


@pytest.mark.cluster
@pytest.mark.model
def test_a_killed_operator_and_pool_worker_are_restarted_and_a_job_still_completes_then_sigterm_ends_all(tmp_path):
    speech = speak("Please call me tomorrow morning.", tmp_path / "speech.wav").read_bytes()
    stack = start_local(tmp_path)
    try:
        started = marked(stack.marker)
        # etcd, the apiserver, the operator, the gateway and the pool worker
        assert len(started) >= 5, started
        killed = {module: child_pid(stack, module) for module in ("ifw.operator", "ifw.runner")}
        assert all(killed.values()), started
        for pid in killed.values():
            os.kill(pid, signal.SIGKILL)
        for module, pid in killed.items():
            wait_for(lambda module=module, pid=pid: child_pid(stack, module) not in (None, pid), 30,
                     f"{module} started again", interval=0.5)  # fmt: skip
        wait_for(lambda: stack.err.read_text().count(" restarted (pid ") >= 2, 10, "the restarts logged")
        assert "exited with code -9" in stack.err.read_text()

        # The sync request waits for the job: the restarted worker takes it once its model is loaded
        # (the operator waits --pool-wait-seconds for a worker), or its own runner process does.
        answer = httpx.post(f"{stack.gateway}/", files={"file": ("speech.wav", speech, "audio/wav")}, timeout=300)
        assert answer.status_code == 200, answer.text + stack.logs()
        assert answer.json()["status"] == "completed" and "call me" in answer.json()["output"]["text"].lower()
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.process.send_signal(signal.SIGTERM)
        try:
            code = stack.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            stack.process.kill()
            raise
    assert code == 0, stack.logs()
    assert "SIGTERM: stopping every process of the stack" in stack.err.read_text()
    ends_with_nothing_left(stack, timeout=10)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.cluster
@pytest.mark.model
def test_stopping_or_killing_ifw_local_leaves_no_process_of_it(tmp_path, signum):
    stack = start_local(tmp_path)
    assert len(marked(stack.marker)) >= 5
    stack.process.send_signal(signum)
    try:
        code = stack.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        stack.process.kill()
        raise
    # SIGINT: it stopped each child itself. SIGKILL: the kernel told each child (PR_SET_PDEATHSIG).
    assert code == (0 if signum == signal.SIGINT else -signal.SIGKILL), stack.logs()
    ends_with_nothing_left(stack, timeout=10 if signum == signal.SIGINT else 90)


def test_allow_host_flags_reach_the_runner_the_gateway_and_the_operator(tmp_path, monkeypatch):
    from ifw.core.runner_settings import RunnerSettings
    from ifw.local import stack as local
    from ifw.operator.config import OperatorSettings

    made = {}
    real = local.LocalStack

    class Made(Exception):
        pass

    def record(work, model, **kwargs):
        made["stack"] = real(work, model, **kwargs)
        raise Made

    monkeypatch.setattr(local, "LocalStack", record)
    monkeypatch.setattr(local.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    with pytest.raises(Made):
        local.main(["--allow-media-host", "10.1.0.0/16", "--allow-media-host", "media.internal",
                    "--allow-webhook-host", "127.0.0.1", "--allow-webhook-host", "*.hooks.internal",
                    "--pool-wait-seconds", "12"])  # fmt: skip
    stack = made["stack"]

    for key, value in stack.runner_env().items():
        monkeypatch.setenv(key, value)
    assert RunnerSettings().fetch_allowlist == ["127.0.0.1", "10.1.0.0/16", "media.internal"]
    gateway = stack.gateway_settings_env(8000)
    assert gateway["IFW_GATEWAY_URL_ALLOWLIST"] == '["127.0.0.1", "10.1.0.0/16", "media.internal"]'
    assert gateway["IFW_GATEWAY_WEBHOOK_ALLOWLIST"] == '["127.0.0.1", "*.hooks.internal"]'
    operator = OperatorSettings.model_validate(stack.operator_config(stack.runner_env(), liveness_port=8080,
                                                                     metrics_port=9090))  # fmt: skip
    assert operator.webhook.allowlist == ["127.0.0.1", "*.hooks.internal"]
    assert operator.pool.wait_seconds == 12

    # The default: a bounded wait for a (restarting) worker, not a Job at once nor forever.
    assert real(tmp_path, "tiny.en").operator_config({}, liveness_port=1, metrics_port=2)["pool"] == {
        "wait_seconds": local.POOL_WAIT_SECONDS} and local.POOL_WAIT_SECONDS > 0  # fmt: skip
    # An entry the SSRF guard could not read is refused at once.
    with pytest.raises(SystemExit) as refused:
        local.main(["--allow-webhook-host", "10.0.0.0/33"])
    assert refused.value.code == 2


def test_a_child_that_keeps_exiting_is_restarted_after_a_doubling_back_off():
    from ifw.local.stack import BACKOFF_CAP_SECONDS, BACKOFF_RESET_SECONDS, Child

    child = Child("operator", [], {}, None, 0.0)  # type: ignore[arg-type]
    delays = [child.backoff(ran=1) for _ in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60] and BACKOFF_CAP_SECONDS == 60
    assert child.backoff(ran=BACKOFF_RESET_SECONDS) == 1  # it ran long enough: the count starts again
