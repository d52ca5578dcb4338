"""Faults injected for real: the gateway process is sent SIGTERM, etcd is stopped (SIGSTOP), the
kube-apiserver is killed and started again. Each test says what a client sees meanwhile and after.

The etcd and apiserver faults run on a control plane of this module's own, so the session's
stays whole for every other test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import Driver, GatewayProcess
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

URL = "https://audio.example.com/talk.mp3"
HOOK = "https://hooks.example.com/done"
AUDIO = ("a.wav", b"RIFF0000WAVEfmt ", "audio/wav")



# ------------------------------------------------------------------ 1. SIGTERM


def test_sigterm_answers_the_waiting_sync_requests_with_their_task_ids_and_exits(kube, crd, namespace, driver,
                                                                                  tmp_path):  # fmt: skip
    gw = GatewayProcess(kube.kubeconfig, namespace, tmp_path, keepalive_seconds="0")
    gw.env["IFW_GATEWAY_INTERNAL_URL"] = gw.url  # uploads on: the runner's fetch is played below
    with gw, ThreadPoolExecutor(2) as pool:
        plain = pool.submit(httpx.post, f"{gw.url}/", json={"url": URL, "managed_task_id": "stays-1"}, timeout=60)
        openai = pool.submit(httpx.post, f"{gw.url}/v1/audio/transcriptions", files={"file": AUDIO}, timeout=60)
        tjs = wait_for(lambda: len(driver.tjs()) == 2 and driver.tjs(), 20, "both TranscriptionJobs")
        upload = next(t for t in tjs if t["metadata"]["name"] != "stays-1")
        # The runner's fetch of the upload (its token is in the URL, and so in the access log's path).
        upload_url = upload["spec"]["audio"]["url"]
        token = upload_url.rsplit("/", 1)[1]
        assert httpx.get(upload_url).content == AUDIO[1]
        assert not plain.done() and not openai.done()

        assert gw.process is not None
        sent = time.monotonic()
        gw.process.send_signal(signal.SIGTERM)
        answers = plain.result(timeout=15), openai.result(timeout=15)
        answered = time.monotonic() - sent
        gw.process.wait(15)
        exited = time.monotonic() - sent

    assert answers[0].status_code == 503, answers[0].text
    assert answers[0].json() == {"detail": "the gateway is restarting; the task goes on: poll /status/stays-1",
                                 "status": "processing", "task_id": "stays-1"}  # fmt: skip
    name = upload["metadata"]["name"]
    assert answers[1].status_code == 503, answers[1].text
    assert answers[1].json() == {"error": {
        "message": f"the gateway is restarting; the task goes on: poll /status/{name}", "type": "server_error",
        "param": None, "code": None, "task_id": name}}  # fmt: skip
    assert answered < 5 and exited < 10, (answered, exited)
    assert gw.process.returncode in (0, -signal.SIGTERM), gw.text()[-2000:]
    # The jobs run on: not deleted, not failed.
    for tj in driver.tjs():
        assert "deletionTimestamp" not in tj["metadata"] and (tj.get("status") or {}).get("phase") != "Failed"
    assert {t["metadata"]["name"] for t in driver.tjs()} == {"stays-1", name}
    # The access log has the upload fetch, its token hidden.
    log = gw.text()
    assert f"/internal/uploads/{namespace}/{name}/***" in log, log[-2000:]
    assert token not in log


def test_shutdown_ends_answers_already_started_with_the_task_id(gateway_factory, driver):
    """A keep-alive answer (200 and spaces sent) and an SSE stream cannot change their status: the
    shutdown's answer is their body, and says the task goes on. uvicorn's signal handler sets
    should_exit; here the test does."""
    gw = gateway_factory(uploads=True, keepalive_seconds=0.2)
    started = [threading.Event(), threading.Event()]
    with httpx.Client(base_url=gw.url, timeout=30) as http, ThreadPoolExecutor(2) as pool:
        def first_bytes_then_rest(which: int, **request):
            with http.stream("POST", **request) as response:
                chunks = response.iter_bytes()
                first = next(chunks)
                started[which].set()  # the answer has started: its status is sent
                return response.status_code, first + b"".join(chunks)

        plain = pool.submit(first_bytes_then_rest, 0, url="/", json={"url": URL, "managed_task_id": "kept-alive"})
        streamed = pool.submit(first_bytes_then_rest, 1, url="/v1/audio/transcriptions",
                               files={"file": AUDIO}, data={"stream": "true"})  # fmt: skip
        wait_for(lambda: len(driver.tjs()) == 2, 20, "both TranscriptionJobs")
        stream_name = next(t["metadata"]["name"] for t in driver.tjs() if t["metadata"]["name"] != "kept-alive")
        driver.progress_text(stream_name, " Hello")  # the stream's first event: a delta
        assert all(e.wait(10) for e in started), "an answer did not start"
        gw.server.should_exit = True
        (plain_status, plain_body), (stream_status, stream_body) = plain.result(15), streamed.result(15)
    assert plain_status == 200 and plain_body.startswith(b" ")
    assert json.loads(plain_body) == {"detail": "the gateway is restarting; the task goes on: poll /status/kept-alive",
                                      "status": "processing", "task_id": "kept-alive"}  # fmt: skip
    events = [json.loads(line[6:]) for line in stream_body.decode().splitlines() if line.startswith("data: ")]
    assert stream_status == 200 and events[0] == {"type": "transcript.text.delta", "delta": "Hello"}  # OpenAI's text: no leading space
    assert events[-1]["error"]["task_id"] == stream_name and "restarting" in events[-1]["error"]["message"]
    assert {t["metadata"]["name"] for t in driver.tjs()} == {"kept-alive", stream_name}  # both run on


def test_a_stopping_gateway_starts_nothing_and_its_probe_says_so(gateway_factory, driver):
    """Between SIGTERM and the connections closing, a request on a connection still open makes no
    job (it would have no one to answer it)."""
    gw = gateway_factory()
    service = gw.app.state.service
    with gw.client() as http:
        assert http.get("/readyz").status_code == 200
        done = threading.Event()
        service.watch._loop.call_soon_threadsafe(lambda: (service.drain(), done.set()))  # on the server's loop
        assert done.wait(5)
        refused = http.post("/", json={"url": URL, "managed_task_id": "too-late"})
        ready = http.get("/readyz")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json() == {"detail": "the gateway is shutting down; send the request again"}
    assert ready.status_code == 503 and ready.json()["checks"]["gateway"] == "shutting down"
    assert driver.tjs() == []


# ------------------------------------------------------------------ 2. upload tokens in messages


@pytest.mark.parametrize(
    ("message", "hidden"),
    [
        # What the runner writes when it cannot fetch an upload: the URL with its token.
        ("cannot reach {url}: [Errno 111] Connection refused", "{token}"),
        ("{url} answered HTTP 404 Not Found", "{token}"),
        # A kubectl-applied job whose URL carried credentials (the gateway refuses those itself).
        ("cannot reach http://alice:s3cret@media.example.com/a.wav: timed out", "alice:s3cret"),
    ],
)
def test_no_upload_token_or_url_credentials_in_anything_the_gateway_returns(gateway_factory, driver, message, hidden):
    gw = gateway_factory(uploads=True)
    with gw.client() as http, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/", files={"file": AUDIO})
        tj = driver.wait_tj()
        url = tj["spec"]["audio"]["url"]
        token = url.rsplit("/", 1)[1]
        text, secret = message.format(url=url), hidden.format(token=token)
        assert secret in text and len(token) >= 32
        name = tj["metadata"]["name"]
        driver.fail(name, "AudioFetchFailed", text)
        answers = [pending.result(timeout=10), http.get(f"/status/{name}"), http.delete(f"/cancel/{name}")]
        driver.patch_status(name, {"webhook": {"attempts": 1, "delivered": False, "lastError": text}})
        answers.append(http.get(f"/status/{name}"))  # the webhook's last error names it too
    assert answers[0].status_code == 422 and answers[0].json()["reason"] == "AudioFetchFailed"
    for answer in answers:
        assert secret not in answer.text, answer.text
        assert "***" in answer.text
    if "{url}" in message:
        assert answers[1].json()["message"] == text.replace(token, "***")


# ------------------------------------------------------------------ a control plane to break


class Breakable:
    """A control plane of our own, whose etcd can be stopped and whose apiserver can be killed
    and started again (same arguments, same port)."""

    def __init__(self, cp, work: Path):
        self.cp = cp
        self.work = work
        self.started: list[subprocess.Popen] = []  # apiservers we started again: ours to stop

    def proc(self, name: str) -> subprocess.Popen:
        return next(p for n, p, _ in self.cp._procs if n == name)

    @property
    def apiserver(self) -> subprocess.Popen:
        return self.started[-1] if self.started else self.proc("ifw-test-apiserver")

    def kill_apiserver(self) -> None:
        proc = self.apiserver
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def start_apiserver(self) -> None:
        old = self.proc("ifw-test-apiserver")
        with open(self.work / f"apiserver-{len(self.started)}.log", "wb") as out:
            self.started.append(subprocess.Popen(old.args, cwd=self.cp._tmp, stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, start_new_session=True))  # fmt: skip

    def stop(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        os.kill(self.proc("etcd").pid, signal.SIGCONT)  # never leave it stopped


@pytest.fixture(scope="module")
def breakable(tmp_path_factory) -> Iterator[Breakable]:
    from kubernetes import config

    from ifw.local.control_plane import ControlPlane
    from ifw.local.crd import install_crd

    with ControlPlane() as cp:
        assert cp.source == "project build", "these faults stop processes of a control plane started here"
        install_crd(config.new_client_from_config(config_file=cp.kubeconfig))
        faults = Breakable(cp, tmp_path_factory.mktemp("faults"))
        try:
            yield faults
        finally:
            faults.stop()


@pytest.fixture
def own(breakable, request) -> Iterator[tuple[Breakable, Driver, str]]:
    """A fresh namespace on the breakable control plane, and a Driver there."""
    from kubernetes import client, config

    name = f"f-{request.node.name[:30].lower().replace('_', '-').strip('-')}-{os.urandom(3).hex()}"
    api = config.new_client_from_config(config_file=breakable.cp.kubeconfig)
    client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    try:
        yield breakable, Driver(api, name), name
    finally:
        api.close()


def _answers_within(method: str, url: str, seconds: float, **kwargs) -> httpx.Response:
    started = time.monotonic()
    response = httpx.request(method, url, timeout=seconds + 30, **kwargs)
    took = time.monotonic() - started
    assert took < seconds, f"{method} {url} took {took:.1f} s (bound {seconds} s): {response.text}"
    return response


# ------------------------------------------------------------------ 3. etcd stops


def test_with_etcd_stopped_answers_are_quick_and_say_the_kubernetes_api_is_unavailable(own, tmp_path):
    faults, driver, namespace = own
    gw = GatewayProcess(faults.cp.kubeconfig, namespace, tmp_path, kube_timeout_seconds="3",
                        readiness_timeout_seconds="2")  # fmt: skip
    gw.env["IFW_GATEWAY_INTERNAL_URL"] = gw.url
    server = faults.cp.server
    assert server is not None
    etcd = faults.proc("etcd")
    with gw:
        os.kill(etcd.pid, signal.SIGSTOP)
        try:
            ready = _answers_within("GET", f"{gw.url}/readyz", 2 + 2)
            posted = _answers_within("POST", f"{gw.url}/", 3 + 2, json={"url": URL, "managed_task_id": "in-outage"})
            status = _answers_within("GET", f"{gw.url}/status/anything", 3 + 2)
            openai = _answers_within("POST", f"{gw.url}/v1/audio/transcriptions", 3 + 2, files={"file": AUDIO})
        finally:
            os.kill(etcd.pid, signal.SIGCONT)
        assert ready.status_code == 503
        assert ready.json()["checks"]["apiserver"] == "the Kubernetes API is unavailable"
        for answer in (posted, status):
            assert answer.status_code == 503
            assert answer.json() == {"detail": "the Kubernetes API is unavailable; try again shortly"}
            assert answer.headers["retry-after"] == "5"
        assert openai.status_code == 503
        assert openai.json()["error"]["message"] == "the Kubernetes API is unavailable; try again shortly"
        host = server.removeprefix("https://")
        for answer in (ready, posted, status, openai):  # no address, no error text of the apiserver's
            assert host not in answer.text and "127.0.0.1" not in answer.text and "Traceback" not in answer.text
        # The details are the log's (which of the two deadlines, the call's or its HTTP request's, came first).
        log = gw.text()
        assert "the Kubernetes API is unavailable: 503 " in log and "readiness: the Kubernetes API check failed" in log
        assert "within 3 s" in log or "timed out" in log, log[-3000:]

        # etcd is back: ready again, and requests are served.
        wait_for(lambda: httpx.get(f"{gw.url}/readyz", timeout=10).status_code == 200, 30, "ready again", interval=0.2)
        body = {"url": URL, "is_async": True, "managed_task_id": "after-outage", "webhook": {"url": HOOK}}
        assert httpx.post(f"{gw.url}/", json=body, timeout=10).status_code == 200
        assert driver.get("after-outage") is not None


# ------------------------------------------------------------------ 4. the apiserver restarts


def _watch_errors(gw: GatewayProcess) -> float:
    metrics = httpx.get(f"{gw.url}/metrics", timeout=5).text
    line = next(x for x in metrics.splitlines() if x.startswith("ifw_gateway_watch_errors_total "))
    return float(line.split()[1])


def test_after_an_apiserver_restart_the_watch_reconnects_at_once_and_the_waiter_is_answered(own, tmp_path):
    faults, driver, namespace = own
    gw = GatewayProcess(faults.cp.kubeconfig, namespace, tmp_path, keepalive_seconds="0")
    with gw, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{gw.url}/", json={"url": URL, "managed_task_id": "survivor"}, timeout=120)
        driver.wait_tj("survivor")
        before = _watch_errors(gw)

        faults.kill_apiserver()
        # Down: not ready, and the watch says it is not connected.
        ready = wait_for(lambda: (r := httpx.get(f"{gw.url}/readyz", timeout=10)).json()["checks"]["watch"] != "ok" and r,
                      10, "/readyz to see the watch disconnected")  # fmt: skip
        assert ready.status_code == 503 and ready.json()["checks"]["watch"].startswith("reconnecting")
        assert ready.json()["checks"]["apiserver"] == "the Kubernetes API is unavailable"
        # Down through six failed reconnections: a back-off doubling from 0.5 s would now wait 16 s.
        wait_for(lambda: _watch_errors(gw) >= before + 6, 40, "six failed reconnections", interval=0.2)

        faults.start_apiserver()
        wait_for(lambda: _serves_tjs(driver), 30, "the apiserver to serve TranscriptionJobs again", interval=0.1)
        back = time.monotonic()
        driver.succeed("survivor")  # the job finishes after the outage, maybe before the watch is back
        answer = pending.result(timeout=30)
        answered = time.monotonic() - back
        wait_for(lambda: httpx.get(f"{gw.url}/readyz", timeout=10).status_code == 200, 10, "ready again")
        ready_after = time.monotonic() - back

    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "completed" and answer.json()["task_id"] == "survivor"
    assert answer.json()["output"]["text"] == " Hello world. Thanks for coming. How are you? Fine."
    assert answered < 6 and ready_after < 6, (answered, ready_after)  # the back-off is capped at 3 s
    assert "watch on " + namespace + " connected" in gw.text()


def _serves_tjs(driver: Driver) -> bool:
    from ifw.crds.transcriptionjob import GROUP, PLURAL, VERSION

    try:
        driver.custom.list_namespaced_custom_object(GROUP, VERSION, driver.namespace, PLURAL, limit=1,
                                                    _request_timeout=2)  # fmt: skip
    except Exception:  # noqa: BLE001 - down, starting, CRD not served yet: not yet
        return False
    return True
