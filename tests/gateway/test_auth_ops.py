"""Auth, probes, metrics, the OpenAPI document and the control-plane-only import."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

pytestmark = pytest.mark.cluster

KEY = "k3y-for-tests-0123456789"
URL = "https://audio.example.com/talk.mp3"


@pytest.fixture
def secured(gateway_factory):
    return gateway_factory(admin_key=KEY)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/tasks"), ("GET", "/status/x"), ("DELETE", "/cancel/x"), ("POST", "/"), ("GET", "/docs"),
     ("GET", "/openapi.json"), ("GET", "/redoc"), ("POST", "/v1/audio/transcriptions")],
)
def test_every_api_route_needs_the_key(secured, method, path):
    with secured.client() as http:
        for headers in ({}, {"x-admin-api-key": "wrong"}, {"x-admin-api-key": KEY[:-1]}, {"authorization": "Bearer nope"}):
            response = http.request(method, path, headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.json() == {"detail": "Unauthorized"}


def test_right_key_works_and_probes_stay_open(secured, driver):
    with secured.client() as http:
        assert http.get("/tasks", headers={"x-admin-api-key": KEY}).json() == {"tasks": []}
        assert http.get("/tasks", headers={"authorization": f"Bearer {KEY}"}).status_code == 200  # OpenAI SDKs
        assert http.get("/openapi.json", headers={"x-admin-api-key": KEY}).status_code == 200
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {"apiserver": "ok", "watch": "ok"}
        assert http.get("/metrics").status_code == 200
        body = {"url": URL, "is_async": True, "webhook": {"url": "https://hooks.example.com/x"}, "managed_task_id": "keyed"}
        assert http.post("/", json=body).status_code == 401
        assert http.post("/", json=body, headers={"x-admin-api-key": KEY}).status_code == 200
    assert driver.get("keyed") is not None


def test_without_a_key_configured_everything_is_open(http):
    assert http.get("/tasks").status_code == 200
    assert http.get("/openapi.json").status_code == 200


def test_tenant_keys_map_to_namespaces(gateway_factory, kube, namespace):
    from kubernetes import client

    other = f"{namespace[:50]}-t2"
    with kube.api_client() as api:
        client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
        gw = gateway_factory(admin_key=KEY, tenant_keys={other: "tenant-two-key"})
        body = {"url": URL, "is_async": True, "webhook": {"url": "https://hooks.example.com/x"}, "managed_task_id": "t"}
        with gw.client() as http:
            assert http.post("/", json=body, headers={"x-admin-api-key": "tenant-two-key"}).status_code == 200
            # The tenant sees its own task; the admin key's namespace does not have it.
            assert http.get("/tasks", headers={"x-admin-api-key": "tenant-two-key"}).json() == {"tasks": ["t"]}
            assert http.get("/tasks", headers={"x-admin-api-key": KEY}).json() == {"tasks": []}
            assert http.get("/status/t", headers={"x-admin-api-key": KEY}).status_code == 404
        custom = client.CustomObjectsApi(api)
        assert custom.get_namespaced_custom_object("ifw.dev", "v1alpha1", other, "transcriptionjobs", "t")
        client.CoreV1Api(api).delete_namespace(other)


def test_readyz_fails_when_the_apiserver_is_unreachable(tmp_path):
    """A gateway pointed at a dead apiserver starts, stays live, and reports not ready (no hang)."""
    from ifw.gateway.config import GatewaySettings
    from tests.gateway.conftest import Server, free_port

    kubeconfig = tmp_path / "kubeconfig"
    port = free_port()
    kubeconfig.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{port}"}}}}]
users: [{{name: u, user: {{token: x}}}}]
contexts: [{{name: c, context: {{cluster: c, user: u}}}}]
current-context: c
"""
    )
    import os

    saved = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)
    try:
        with Server(GatewaySettings(namespace="default", upload_dir=tmp_path)) as gw, gw.client() as http:
            assert http.get("/healthz").status_code == 200
            ready = http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["apiserver"] == "the Kubernetes API is unavailable"
            assert ready.json()["checks"]["watch"] == "not synced yet"
            response = http.post("/", json={"url": URL})
            # Said in fixed words: the apiserver's address and the socket error are the log's.
            assert response.status_code == 503
            assert response.json() == {"detail": "the Kubernetes API is unavailable; try again shortly"}
            assert str(port) not in ready.text + response.text
    finally:
        if saved is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved


def test_metrics_count_requests_and_waiters(http, driver):
    # The counters are the process's: other tests' requests are in them too, so count the change.
    tasks = 'ifw_gateway_requests_total{method="GET",route="/tasks",status="200"}'
    refused = 'ifw_gateway_requests_total{method="POST",route="/",status="400"}'  # the original's "Invalid URL"
    before = _samples(http.get("/metrics").text)
    http.get("/tasks")
    assert http.post("/", json={"url": "ftp://x"}).status_code == 400
    text = http.get("/metrics").text
    after = _samples(text)
    assert after[tasks] == before.get(tasks, 0) + 1 and after[refused] == before.get(refused, 0) + 1
    assert "ifw_gateway_sync_waiters 0.0" in text
    assert "ifw_gateway_watch_lists_total" in text


def _samples(text: str) -> dict[str, float]:
    """Prometheus text: sample (name and labels) -> value."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}  # fmt: skip


def test_openapi_documents_every_field(http):
    spec = http.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    body = schemas["TranscribeRequest"]["properties"]
    for field in ("url", "task", "language", "batch_size", "timestamp", "diarise_audio", "webhook", "is_async", "managed_task_id"):
        assert body[field].get("description"), field
    assert body["batch_size"]["default"] == 64 and body["batch_size"]["maximum"] == 256
    assert body["language"]["default"] == "None"
    content = spec["paths"]["/"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", "multipart/form-data"}
    assert {"/tasks", "/status/{task_id}", "/cancel/{task_id}", "/v1/audio/transcriptions"} <= set(spec["paths"])


def test_gateway_import_is_torch_free():
    code = "import sys, ifw.gateway.app; bad = [m for m in ('torch', 'transformers', 'pyannote') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_watch_resumes_after_the_connection_drops(gateway, http, driver):
    """Cut the watch's connection under it: it resumes from its resourceVersion and still wakes waiters."""
    from concurrent.futures import ThreadPoolExecutor

    watch = gateway.app.state.service.watch
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/", json={"url": URL, "managed_task_id": "resume"})
        driver.wait_tj("resume")
        _wait_until(lambda: _connected(watch))
        _cut(watch)
        driver.succeed("resume")
        assert pending.result(timeout=15).status_code == 200


def test_watch_relists_after_410_gone(gateway, http, driver):
    """A real 410 (the apiserver no longer has our resourceVersion) makes the watch relist and carry on."""
    from concurrent.futures import ThreadPoolExecutor

    from ifw.gateway import metrics

    watch = gateway.app.state.service.watch
    lists_before = metrics.WATCH_LISTS._value.get()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/", json={"url": URL, "managed_task_id": "expired"})
        driver.wait_tj("expired")
        _wait_until(lambda: _connected(watch))
        # Let the TranscriptionJob's own events arrive first, or one could overwrite the stale version set below.
        _wait_until(lambda: (driver.namespace, "expired") in watch.objects)
        _wait_until(lambda: watch.has_waiters(driver.namespace, "expired"))
        watch.watchers[driver.namespace].version = "2"  # long compacted: the apiserver answers 410 Expired
        _cut(watch)
        _wait_until(lambda: metrics.WATCH_LISTS._value.get() > lists_before)
        driver.succeed("expired")
        assert pending.result(timeout=15).status_code == 200


def test_a_relist_that_misses_a_tj_wakes_its_waiter(gateway, http, driver):
    """TranscriptionJobs deleted while the watch was down are absent from the relist: their waiters learn it."""
    from concurrent.futures import ThreadPoolExecutor

    watch = gateway.app.state.service.watch
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/", json={"url": URL, "managed_task_id": "missed"})
        driver.wait_tj("missed")
        # Both the cached TranscriptionJob and the request's waiter must exist before the relist drops it.
        _wait_until(lambda: (driver.namespace, "missed") in watch.objects)
        _wait_until(lambda: watch.has_waiters(driver.namespace, "missed"))
        watch._post(watch._replace, driver.namespace, [])  # what a list taken after the deletion returns
        response = pending.result(timeout=10)
    assert response.status_code == 409 and response.json()["status"] == "cancelled"


def _wait_until(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _connected(watch) -> bool:
    return bool(watch.watchers) and all(w.connected for w in watch.watchers.values())


def _cut(watch) -> None:
    for watcher in watch.watchers.values():
        watcher.interrupt()


def test_internal_upload_route_is_open_but_token_checked(http):
    assert http.get("/internal/uploads/default/x/abc").status_code == 404


def test_httpx_asgi_and_uvicorn_agree(gateway):
    """The same app answers identically in-process (ASGI) — used by the schema fuzz run."""
    import asyncio

    async def run():
        transport = httpx.ASGITransport(app=gateway.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return (await client.get("/healthz")).json()

    assert asyncio.run(run()) == {"status": "ok"}


def test_a_task_is_listed_right_after_its_post_even_before_the_watch_shows_it(gateway, http, driver, monkeypatch):
    """GET /tasks reads the watch's cache; a client that lists its tasks right after POST / must
    still see the new one (the original listed it from memory), though the watch event lags."""
    from ifw.gateway.watch import TjWatch

    watch = gateway.app.state.service.watch
    _wait_until(lambda: watch.synced)
    held: list = []
    monkeypatch.setattr(watch, "_post", lambda fn, *args: held.append((fn, args)))  # the watch runs late
    body = {"url": URL, "is_async": True, "managed_task_id": "just-posted",
            "webhook": {"url": "https://hooks.example.com/done"}}  # fmt: skip
    assert http.post("/", json=body).status_code == 200
    assert (driver.namespace, "just-posted") not in watch.objects  # the cache has not seen it
    assert http.get("/tasks").json() == {"tasks": ["just-posted"]}

    monkeypatch.undo()  # the watch catches up: its event replaces the stand-in, listed once
    for fn, args in held:
        TjWatch._post(watch, fn, *args)
    _wait_until(lambda: (driver.namespace, "just-posted") in watch.objects)
    assert http.get("/tasks").json() == {"tasks": ["just-posted"]} and not watch._created
