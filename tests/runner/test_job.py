"""Job mode against the real test kube-apiserver: `python -m ifw.runner job` as the Pod runs it.

The runner reads its own TranscriptionJob, transcribes spec.audio.url (served
here on loopback, allowed through the SSRF guard by IFW_FETCH_ALLOWLIST),
writes only its part of the status through /status, stores the result in a
Secret, and exits 0; or writes the termination message and exits 2/1.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from ifw.core import contract, results
from ifw.crds.transcriptionjob import API_VERSION, GROUP, KIND, PLURAL, VERSION

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def audio_server(speech):
    """Serves the generated clips on 127.0.0.1 (the runner fetches over HTTP as in a cluster)."""
    clip = speech([
        ("en-us", "Please open the window because it is very warm in here.", 0.8),
        ("en-gb", "The children are playing football in the garden.", 0.5),
    ])  # fmt: skip

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(clip.path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", clip
    server.shutdown()


@pytest.fixture
def objects(kube, tj_crd):
    from kubernetes import client

    with kube.api_client() as api:
        yield client.CustomObjectsApi(api), client.CoreV1Api(api)


def create_job(objects, namespace: str, url: str, **spec) -> dict:
    """A TranscriptionJob and, as the operator makes it before the runner starts, its empty result Secret."""
    custom, core = objects
    body = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": f"tj-{uuid.uuid4().hex[:8]}", "namespace": namespace},
        "spec": {"audio": {"url": url}, **spec},
    }
    job = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    core.create_namespaced_secret(namespace, results.result_secret(job))
    return job


def run_runner(kube, job: dict, tmp_path: Path, uid: str | None = None, **env) -> tuple[int, dict | None, str]:
    """Run the Pod's command; returns (exit code, termination message, stderr)."""
    message = tmp_path / "termination-log"
    base = {k: v for k, v in os.environ.items() if not k.startswith("IFW_")}
    base.update(
        KUBECONFIG=kube.kubeconfig,
        OMP_NUM_THREADS="2",
        HF_HUB_OFFLINE="1",
        IFW_JOB_NAMESPACE=job["metadata"]["namespace"],
        IFW_JOB_NAME=job["metadata"]["name"],
        IFW_JOB_UID=uid or job["metadata"]["uid"],
        IFW_TERMINATION_MESSAGE_PATH=str(message),
        IFW_DEFAULT_MODEL="tiny.en",
        IFW_DEVICE="cpu",
        IFW_CPU_THREADS="2",
        IFW_WORK_DIR=str(tmp_path / "work"),
        IFW_FETCH_ALLOWLIST='["127.0.0.1"]',
        IFW_PROGRESS_INTERVAL_SECONDS="0.5",
        **env,
    )
    p = subprocess.run([sys.executable, "-m", "ifw.runner", "job"], env=base, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    return p.returncode, json.loads(message.read_text()) if message.exists() else None, p.stderr


def watch_statuses(objects, job: dict) -> list[dict]:
    """Every status the job's object goes through, collected by a watch in the background."""
    from kubernetes import watch

    custom, _ = objects
    seen: list[dict] = []

    def follow() -> None:
        stream = watch.Watch().stream(
            custom.list_namespaced_custom_object, GROUP, VERSION, job["metadata"]["namespace"], PLURAL,
            field_selector=f"metadata.name={job['metadata']['name']}", timeout_seconds=120,
            # From the job's own version: a watch "from now" right after other writes (the result
            # Secret) can wait on the watch cache and time out (504) on the test server's etcd.
            resource_version=job["metadata"]["resourceVersion"],
        )
        for event in stream:
            status = event["object"].get("status") or {}
            seen.append(status)
            if "result" in status:
                return

    threading.Thread(target=follow, daemon=True).start()
    return seen


def read(objects, job: dict) -> dict:
    custom, _ = objects
    return custom.get_namespaced_custom_object(
        GROUP, VERSION, job["metadata"]["namespace"], PLURAL, job["metadata"]["name"]
    )


@pytest.mark.model
def test_job_transcribes_writes_its_status_and_stores_the_result(kube, objects, namespace, audio_server, tmp_path, wer):
    base_url, clip = audio_server
    job = create_job(objects, namespace, f"{base_url}/{clip.path.name}", timestamp="word")
    seen = watch_statuses(objects, job)
    code, message, stderr = run_runner(kube, job, tmp_path)
    assert code == 0, stderr
    assert message is None
    # While it works, the duration is already visible (kubectl's Duration column) with the progress.
    time.sleep(1.0)
    working = [s for s in seen if "result" not in s and "audio" in s]
    assert working, seen
    assert working[0]["audio"]["durationSeconds"] == pytest.approx(clip.duration, abs=0.05)
    assert working[0]["progress"]["percent"] < 100

    status = read(objects, job)["status"]
    # the runner writes only its own fields; conditions/phase/times belong to the operator
    assert set(status) == {"progress", "audio", "result"}
    assert status["progress"]["percent"] == 100.0
    assert status["progress"]["totalSeconds"] == pytest.approx(clip.duration, abs=0.05)
    assert status["audio"]["durationSeconds"] == pytest.approx(clip.duration, abs=0.05)
    assert status["audio"]["language"] == "en"
    result = status["result"]
    assert result["store"] == "secret" and result["sizeBytes"] > 0 and len(result["sha256"]) == 64

    _, core = objects
    # The runner patched in the data only: the Secret is still the operator's, owner and labels intact.
    secret = core.read_namespaced_secret(result["ref"], namespace)
    built = results.result_secret(job)["metadata"]
    assert secret.metadata.labels == built["labels"]
    assert [core.api_client.sanitize_for_serialization(o) for o in secret.metadata.owner_references] == \
        built["ownerReferences"]
    assert secret.metadata.annotations[contract.ANNOTATION_RESULT_SHA256] == result["sha256"]
    transcript = results.load_result(result, namespace, job_uid=job["metadata"]["uid"], core_v1=core)
    assert wer(clip.text, transcript.text) <= 0.2, transcript.text
    assert transcript.timestamp == "word" and all(s.words for s in transcript.segments)
    assert transcript.segments[0].start == pytest.approx(clip.utterances[0].start, abs=1.0)


def test_job_refuses_a_uid_mismatch(kube, objects, namespace, audio_server, tmp_path):
    base_url, clip = audio_server
    job = create_job(objects, namespace, f"{base_url}/{clip.path.name}")
    code, message, _ = run_runner(kube, job, tmp_path, uid=str(uuid.uuid4()))
    assert code == 2
    assert message["reason"] == "InvalidSpec" and "deleted and recreated" in message["message"]
    assert "status" not in read(objects, job) or not read(objects, job)["status"].get("result")


@pytest.mark.model
def test_job_with_missing_audio_fails_as_bad_input(kube, objects, namespace, audio_server, tmp_path):
    base_url, _ = audio_server
    job = create_job(objects, namespace, f"{base_url}/no-such-file.wav")
    code, message, _ = run_runner(kube, job, tmp_path)
    assert code == 2
    assert message["reason"] == "AudioFetchFailed" and "404" in message["message"]


def test_job_for_a_deleted_object_exits_bad_input(kube, objects, namespace, tmp_path):
    job = {"metadata": {"namespace": namespace, "name": "never-created", "uid": str(uuid.uuid4())}}
    code, message, _ = run_runner(kube, job, tmp_path)
    assert code == 2 and message["reason"] == "InvalidSpec" and "does not exist" in message["message"]


def test_job_when_the_apiserver_is_unreachable_is_transient(objects, namespace, tmp_path):
    job = {"metadata": {"namespace": namespace, "name": "x", "uid": str(uuid.uuid4())}}
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "users": [{"name": "u", "user": {}}],
    }))  # fmt: skip

    class Down:
        pass

    down = Down()
    down.kubeconfig = str(kubeconfig)
    code, message, _ = run_runner(down, job, tmp_path)
    assert code == 1 and message["reason"] == "RunnerFailed"


@pytest.mark.model
def test_an_apiserver_outage_after_the_transcription_is_waited_out_not_redone(speech, tmp_path, wer):
    """The apiserver dies mid-job and stays down past the end of the decode: the pod keeps its
    transcript, retries the result write, and finishes once the apiserver is back (one run)."""
    import functools

    from kubernetes import client, config

    from ifw.local.control_plane import ControlPlane
    from ifw.local.crd import install_crd

    long = speech([("en-us", "The meeting starts at nine in the morning and the report is due on Friday.", 0.8)] * 4,
                  name="outage")  # fmt: skip
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(long.path.parent))
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    with ControlPlane() as cp:  # its own: this test kills it
        api = config.new_client_from_config(config_file=cp.kubeconfig)
        install_crd(api)
        custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": "outage"}})
        job = create_job((custom, core), "outage", f"http://127.0.0.1:{origin.server_port}/{long.path.name}",
                         batchSize=1)  # fmt: skip
        message, log = tmp_path / "termination-log", tmp_path / "runner.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("IFW_")} | {
            "KUBECONFIG": cp.kubeconfig, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1",
            "IFW_JOB_NAMESPACE": "outage", "IFW_JOB_NAME": job["metadata"]["name"], "IFW_JOB_UID": job["metadata"]["uid"],
            "IFW_TERMINATION_MESSAGE_PATH": str(message), "IFW_DEFAULT_MODEL": "tiny.en", "IFW_DEVICE": "cpu",
            "IFW_CPU_THREADS": "2", "IFW_WORK_DIR": str(tmp_path / "work"), "IFW_FETCH_ALLOWLIST": '["127.0.0.1"]',
            "IFW_PROGRESS_INTERVAL_SECONDS": "0.2"}  # fmt: skip
        with log.open("w") as out:
            runner = subprocess.Popen([sys.executable, "-m", "ifw.runner", "job"], env=env, cwd=ROOT,
                                      stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            def progressed():
                obj = custom.get_namespaced_custom_object(GROUP, VERSION, "outage", PLURAL, job["metadata"]["name"])
                return (obj.get("status") or {}).get("progress")

            deadline = time.monotonic() + 120
            while not progressed():
                assert time.monotonic() < deadline and runner.poll() is None, log.read_text()[-3000:]
                time.sleep(0.1)
            apiserver = [name for name, _, _ in cp._procs if "apiserver" in name]
            for name, proc, _ in cp._procs:
                if name in apiserver:
                    cp._terminate(name, proc)
            # Down until the runner has transcribed everything and found it cannot store it.
            deadline = time.monotonic() + 180
            while "storing the result failed" not in log.read_text():
                assert time.monotonic() < deadline and runner.poll() is None, log.read_text()[-3000:]
                time.sleep(0.2)
            cp.restart(tuple(apiserver))
            assert runner.wait(timeout=120) == 0, log.read_text()[-3000:]
        finally:
            if runner.poll() is None:
                runner.kill()
            origin.shutdown()
        status = custom.get_namespaced_custom_object(GROUP, VERSION, "outage", PLURAL, job["metadata"]["name"])["status"]
        transcript = results.load_result(status["result"], "outage", job_uid=job["metadata"]["uid"], core_v1=core)
        # Every utterance is there once (tiny.en mishears some espeak words differently per CPU, so WER is loose).
        assert transcript.text.lower().count("friday") == long.text.lower().count("friday"), transcript.text
        assert wer(long.text, transcript.text) <= 0.5, transcript.text
        assert status["progress"]["percent"] == 100.0 and not message.exists()


@pytest.mark.model
def test_a_file_cut_short_is_transcribed_as_far_as_it_goes_and_says_so(kube, objects, namespace, conversation,
                                                                       tmp_path, wer):  # fmt: skip
    """Real speech as FLAC, its second half missing (an interrupted upload): the job succeeds with what is
    there, and the status and the stored transcript say the file was cut short (runner/README.md)."""
    served = tmp_path / "served"
    served.mkdir()
    whole = served / "whole.flac"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(conversation.path), str(whole)], check=True)
    data = whole.read_bytes()
    (served / "cut.flac").write_bytes(data[: len(data) * 6 // 10])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    try:
        job = create_job(objects, namespace, f"http://127.0.0.1:{origin.server_port}/cut.flac")
        code, message, stderr = run_runner(kube, job, tmp_path)
    finally:
        origin.shutdown()
    assert code == 0 and message is None, stderr
    audio = read(objects, job)["status"]["audio"]
    assert audio["cutShort"] is True
    assert audio["statedSeconds"] == pytest.approx(conversation.duration, abs=0.05)
    assert 0.5 * conversation.duration < audio["durationSeconds"] < 0.65 * conversation.duration
    assert f"before the {conversation.duration:.1f} s its container states" in audio["note"]
    transcript = results.load_result(read(objects, job)["status"]["result"], namespace,
                                     job_uid=job["metadata"]["uid"], core_v1=objects[1])  # fmt: skip
    assert transcript.cut_short and transcript.stated_duration == audio["statedSeconds"]
    assert transcript.duration == audio["durationSeconds"] and transcript.audio_note == audio["note"]
    heard = [u for u in conversation.utterances if u.end < audio["durationSeconds"] - 0.5]
    assert wer(" ".join(u.text for u in heard), transcript.text) <= 0.35, transcript.text
