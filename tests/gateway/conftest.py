"""Gateway test fixtures: the CRD on the real test apiserver, a real uvicorn
server on loopback, and a `Driver` that plays the operator and the runner
(there is no controller on the test apiserver): it finds the TranscriptionJobs the gateway
created, patches their /status and stores results with ifw.core.results.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ifw.core.transcript import ProcessedBy, Segment, SpeakerTurn, Transcript, Word
from ifw.crds.transcriptionjob import GROUP, PLURAL, VERSION
from tests.speaking import speak

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def crd(tj_crd):
    """The TranscriptionJob CRD, installed once for the session (tests/conftest.py)."""
    return tj_crd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The gateway's own uvicorn server (ifw.gateway.app.server) running create_app(settings) in a thread."""

    def __init__(self, settings, port: int | None = None):
        from ifw.gateway.app import create_app, server

        self.settings = settings
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        self.server = server(self.app, settings, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 30, **kwargs})


@pytest.fixture
def gateway_factory(kube, crd, namespace, tmp_path) -> Iterator[Callable[..., Server]]:
    """gateway_factory(**settings) -> a started Server serving `namespace`."""
    from ifw.gateway.config import GatewaySettings

    with contextlib.ExitStack() as stack:

        def start(uploads: bool = False, **overrides: Any) -> Server:
            """uploads=True: the gateway serves uploads to runners at its own loopback address."""
            port = free_port()
            values: dict[str, Any] = {
                "namespace": namespace,
                "sync_timeout_seconds": 30,
                "upload_dir": tmp_path / "uploads",
                "url_allowlist": [],
            }
            if uploads:
                values["internal_url"] = f"http://127.0.0.1:{port}"
            values.update(overrides)
            return stack.enter_context(Server(GatewaySettings(**values), port))

        yield start


@pytest.fixture(scope="session")
def wav(tmp_path_factory) -> Path:
    """Real speech (espeak-ng) to upload: "Hello world. How are you?"."""
    return speak("Hello world. How are you?", tmp_path_factory.mktemp("speech") / "hello.wav", rate=175)


@pytest.fixture
def gateway(gateway_factory) -> Server:
    return gateway_factory()


@pytest.fixture
def http(gateway) -> Iterator[httpx.Client]:
    with gateway.client() as c:
        yield c


# ------------------------------------------------------------------ driver


def transcript(timestamp: str = "chunk", speakers: bool = False) -> Transcript:
    """What a runner stores for a short exchange, as Whisper writes it: every chunk and word
    text has its leading space, so the chunks join into the text; per-segment scores; the pod
    that did it. Diarized: SPEAKER_00 says the first two segments, SPEAKER_01 the third but
    for its last word, which SPEAKER_00 says (a turn of several chunks, and a change of
    speaker inside a segment: the merged turns are not the chunks)."""
    w = [
        [(0.2, 0.6, " Hello", "SPEAKER_00"), (0.6, 1.1, " world.", "SPEAKER_00")],
        [(1.3, 1.7, " Thanks", "SPEAKER_00"), (1.7, 1.9, " for", "SPEAKER_00"), (1.9, 2.4, " coming.", "SPEAKER_00")],
        [(2.9, 3.1, " How", "SPEAKER_01"), (3.1, 3.3, " are", "SPEAKER_01"), (3.3, 3.6, " you?", "SPEAKER_01"),
         (3.7, 4.0, " Fine.", "SPEAKER_00")],
    ]  # fmt: skip
    seg_speakers = ["SPEAKER_00", "SPEAKER_00", "SPEAKER_01"]
    scores = [
        dict(tokens=[2425, 1002, 13], logprobs=[-0.11, -0.2, -0.05], avg_logprob=-0.12, temperature=0.0,
             compression_ratio=0.93, no_speech_prob=0.01),
        dict(tokens=[6952, 337, 1348, 13], logprobs=[-0.3, -0.1, -0.4, -0.02], avg_logprob=-0.205, temperature=0.0,
             compression_ratio=0.95, no_speech_prob=0.02),
        dict(tokens=[1012, 366, 291, 30, 12883, 13], logprobs=[-0.2, -0.1, -0.1, -0.3, -0.9, -0.1],
             avg_logprob=-0.283, temperature=0.2, compression_ratio=1.04, no_speech_prob=0.05),
    ]  # fmt: skip
    word = timestamp == "word"
    segs = []
    for i, words in enumerate(w):
        segs.append(
            Segment(
                start=words[0][0],
                end=words[-1][1],
                text="".join(t for _, _, t, _ in words),
                speaker=seg_speakers[i] if speakers else None,
                words=[Word(start=s, end=e, text=t, speaker=spk if speakers else None, probability=0.9)
                       for s, e, t, spk in words] if word else None,
                language="en",
                **scores[i],
            )
        )  # fmt: skip
    turns = None
    if speakers:
        turns = [SpeakerTurn(speaker="SPEAKER_00", start=0.2, end=2.4, text=" Hello world. Thanks for coming.")]
        if word:  # words are the unit: the change inside the third segment makes its own turn
            turns += [SpeakerTurn(speaker="SPEAKER_01", start=2.9, end=3.6, text=" How are you?"),
                      SpeakerTurn(speaker="SPEAKER_00", start=3.7, end=4.0, text=" Fine.")]  # fmt: skip
        else:
            turns += [SpeakerTurn(speaker="SPEAKER_01", start=2.9, end=4.0, text=" How are you? Fine.")]
    return Transcript(
        text=" Hello world. Thanks for coming. How are you? Fine.",
        segments=segs,
        timestamp=timestamp,
        language="en",
        language_probability=0.98,
        duration=4.5,
        model="openai/whisper-tiny",
        speakers=turns,
        processed_by=ProcessedBy(pod="tj-talk-runner-x7k2p", node="gpu-node-3", runtime="Job"),
    )


class Driver:
    """Plays the operator (phase, reason, conditions) and the runner (progress, result)."""

    def __init__(self, api, namespace: str):
        from kubernetes import client

        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes import client

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def tjs(self) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)["items"]

    def wait_tj(self, name: str | None = None, timeout: float = 20) -> dict[str, Any]:
        """The named TranscriptionJob (or the only one) once it exists."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if name:
                tj = self.get(name)
                if tj:
                    return tj
            else:
                tjs = self.tjs()
                if tjs:
                    assert len(tjs) == 1, [j["metadata"]["name"] for j in tjs]
                    return tjs[0]
            time.sleep(0.05)
        raise AssertionError(f"no TranscriptionJob {name or ''} appeared in {self.namespace}")

    def patch_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, name, {"status": status}
        )

    def running(self, name: str, percent: float = 40.0) -> None:
        self.patch_status(
            name,
            {
                "phase": "Running",
                "progress": {"percent": percent, "processedSeconds": 1.2, "totalSeconds": 3.0},
                "audio": {"durationSeconds": 3.0, "language": "en"},
            },
        )

    def progress_text(self, name: str, text: str, percent: float = 50.0) -> None:
        """The runner of a streaming job: the text of the audio so far, as pieces finish."""
        self.patch_status(name, {"phase": "Running", "progress": {"percent": percent, "text": text}})

    def store(self, name: str, result: Transcript | None = None) -> dict[str, Any]:
        """The operator's part (the empty result Secret), then the runner's (its data); returns the ref."""
        from kubernetes import client

        from ifw.core import results

        tj = self.get(name)
        assert tj is not None
        try:
            self.core.create_namespaced_secret(self.namespace, results.result_secret(tj))
        except client.ApiException as exc:
            if exc.status != 409:
                raise
        return results.store_result(result or transcript(), tj, results.ResultSettings(), core_v1=self.core)

    def report_result(self, name: str, result: Transcript | None = None) -> dict[str, Any]:
        """The runner's part: store the result and point status.result at it."""
        ref = self.store(name, result)
        self.patch_status(name, {"result": ref, "progress": {"percent": 100.0}})
        return ref

    def succeed(self, name: str, result: Transcript | None = None, one_patch: bool = False) -> dict[str, Any]:
        """Runner then operator (two status writes, as in the real flow), or both in one patch."""
        done = {"phase": "Succeeded", "conditions": [_condition("Succeeded", "True", "Completed", "transcribed")]}
        if one_patch:
            done["result"] = self.store(name, result)
        else:
            self.report_result(name, result)
        return self.patch_status(name, done)

    def fail(self, name: str, reason: str, message: str) -> dict[str, Any]:
        return self.patch_status(
            name,
            {"phase": "Failed", "reason": reason, "message": message, "conditions": [_condition("Failed", "True", reason, message)]},
        )


def _condition(kind: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@pytest.fixture
def driver(kube, crd, namespace) -> Iterator[Driver]:
    with kube.api_client() as api:
        yield Driver(api, namespace)


# ------------------------------------------------------------------ a gateway process


class GatewayProcess:
    """`python -m ifw.gateway` as its image runs it, in its own session, logging to a file:
    for faults that need a real process (signals) or a control plane of the test's own."""

    def __init__(self, kubeconfig: str, namespace: str, work: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / f"gateway-{self.port}.log"
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith("IFW_GATEWAY_") and k not in ("ADMIN_KEY", "HF_TOKEN")}  # fmt: skip
        self.env = {**inherited, "KUBECONFIG": kubeconfig, "IFW_GATEWAY_NAMESPACE": namespace,
                    "IFW_GATEWAY_HOST": "127.0.0.1", "IFW_GATEWAY_PORT": str(self.port),
                    "IFW_GATEWAY_LOG_FORMAT": "text", "IFW_GATEWAY_UPLOAD_DIR": str(work / "uploads"),
                    **{f"IFW_GATEWAY_{k.upper()}": v for k, v in env.items()}}  # fmt: skip
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> GatewayProcess:
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "ifw.gateway"], env=self.env, cwd=REPO,
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the gateway exited with {self.process.returncode}:\n{self.text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"the gateway was not ready within {timeout} s:\n{self.text()[-3000:]}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def pytest_terminal_summary(terminalreporter, config):
    """The bad-input catalogue's case -> outcome table (test_bad_input.py), with IFW_CATALOGUE=1 or -v."""
    module = sys.modules.get("tests.gateway.test_bad_input")
    rows = getattr(module, "OUTCOMES", None)
    if not rows or not (os.environ.get("IFW_CATALOGUE") or config.option.verbose > 0):
        return
    write = terminalreporter.write_line
    write("")
    write(f"bad-input catalogue: {len(rows)} cases")
    write("| surface | case | id | outcome |")
    write("|---|---|---|---|")
    for surface, sent, case, outcome in rows:
        write(f"| {surface} | {sent} | `{case}` | {outcome.replace('|', '/')} |")


# The fixtures most HTTP test modules share. `gw` and `client` take the admin key from the module's KEY.


@pytest.fixture
def pool():
    """Threads for requests that wait on the job the test then plays the runner of."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as p:
        yield p


@pytest.fixture
def gw(gateway_factory, request):
    return gateway_factory(uploads=True, admin_key=request.module.KEY, diarization_available=True)


@pytest.fixture
def client(gw, request):
    """The official OpenAI SDK pointed at the gateway."""
    import openai

    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=request.module.KEY, max_retries=0, timeout=30)
