"""`ifw local` supervises what it starts and leaves nothing behind.

- a SIGKILLed operator and pool worker are started again (logged) and a job still completes;
- SIGTERM, SIGINT (`docker stop`: the standalone image's STOPSIGNAL) and SIGKILL of `ifw local`
  end every process it started: etcd, the apiserver, the operator, the gateway, the worker.
  The processes are found by a marker in their environment, which each one inherits;
- the --allow-*-host flags reach the runner, the gateway and the operator.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.speaking import speak
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
MARKER = "IFW_TEST_LOCAL_STACK_MARKER"


class Started:
    def __init__(self, process: subprocess.Popen, marker: str, out: Path, err: Path, gateway: str):
        self.process, self.marker, self.out, self.err, self.gateway = process, marker, out, err, gateway

    def logs(self) -> str:
        return f"--- stdout\n{self.out.read_text()[-3000:]}\n--- stderr\n{self.err.read_text()[-5000:]}"


def _start(tmp_path: Path, *extra: str) -> Started:
    """`ifw local --serve` with tiny.en, as a user starts it; returns once it says where the gateway is."""
    marker = uuid.uuid4().hex
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("ifw")), "local", "--serve", "--model", "tiny.en", *extra],
            cwd=REPO, env={**os.environ, MARKER: marker}, stdout=stdout, stderr=stderr,
        )

    def gateway() -> str | None:
        if process.poll() is not None:
            raise AssertionError(f"ifw local exited with {process.returncode}\n{err.read_text()[-5000:]}")
        found = re.search(r"^gateway: (\S+)", out.read_text(), re.MULTILINE)
        return found.group(1) if found else None

    try:
        return Started(process, marker, out, err, wait_for(gateway, 300, "ifw local to serve", interval=0.5))
    except BaseException:
        process.kill()
        process.wait()
        raise


def _marked(marker: str) -> dict[int, str]:
    """Live processes (not zombies) whose environment holds the marker: pid -> command line."""
    needle = f"{MARKER}={marker}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def _child(stack: Started, module: str) -> int | None:
    """The pid of the child that runs `python -m <module>`."""
    return next((pid for pid, cmd in _marked(stack.marker).items() if f" -m {module}" in cmd), None)


def _ends_with_nothing_left(stack: Started, timeout: float = 90) -> None:
    try:
        wait_for(lambda: not _marked(stack.marker), timeout, "every process of the stack to end", interval=0.5)
    except AssertionError:
        left = _marked(stack.marker)
        for pid in left:  # the test's own clean-up: these are the stack's processes, by their marker
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"left running: {left}\n{stack.logs()}") from None


@pytest.mark.cluster
@pytest.mark.model
def test_a_killed_operator_and_pool_worker_are_restarted_and_a_job_still_completes_then_sigterm_ends_all(tmp_path):
    speech = speak("Please call me tomorrow morning.", tmp_path / "speech.wav").read_bytes()
    stack = _start(tmp_path)
    try:
        started = _marked(stack.marker)
        # etcd, the apiserver, the operator, the gateway and the pool worker
        assert len(started) >= 5, started
        killed = {module: _child(stack, module) for module in ("ifw.operator", "ifw.runner")}
        assert all(killed.values()), started
        for pid in killed.values():
            os.kill(pid, signal.SIGKILL)
        for module, pid in killed.items():
            wait_for(lambda module=module, pid=pid: _child(stack, module) not in (None, pid), 30,
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
    _ends_with_nothing_left(stack, timeout=10)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.cluster
@pytest.mark.model
def test_stopping_or_killing_ifw_local_leaves_no_process_of_it(tmp_path, signum):
    stack = _start(tmp_path)
    assert len(_marked(stack.marker)) >= 5
    stack.process.send_signal(signum)
    try:
        code = stack.process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        stack.process.kill()
        raise
    # SIGINT: it stopped each child itself. SIGKILL: the kernel told each child (PR_SET_PDEATHSIG).
    assert code == (0 if signum == signal.SIGINT else -signal.SIGKILL), stack.logs()
    _ends_with_nothing_left(stack, timeout=10 if signum == signal.SIGINT else 90)


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
