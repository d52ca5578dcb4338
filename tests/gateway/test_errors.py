"""Error answers over HTTP: each typed error (ifw.gateway.errors) in the original API's body, or in
OpenAI's under /v1/, with the fields that apply (task_id, reason) carried into either shape."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.cluster

AUDIO = ("a.wav", b"RIFF0000WAVEfmt ", "audio/wav")


def test_openai_routes_answer_in_openai_shape(gateway):
    with gateway.client() as http:  # no internal_url: uploads are off
        response = http.post("/v1/audio/transcriptions", files={"file": AUDIO}, data={"model": "whisper-1"})
    assert response.status_code == 503
    assert response.json() == {
        "error": {
            "message": "file: uploads are not enabled on this server (IFW_GATEWAY_INTERNAL_URL unset); send a url",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


def test_openai_sync_timeout_carries_the_task_id(gateway_factory, driver):
    gw = gateway_factory(uploads=True, sync_timeout_seconds=0.3)
    with gw.client() as http:
        response = http.post("/v1/audio/translations", files={"file": AUDIO})
    assert response.status_code == 504
    error = response.json()["error"]
    name = driver.wait_tj()["metadata"]["name"]
    assert error == {
        "message": f"Task is still running after 0.3 s; poll /status/{name}",
        "type": "server_error",
        "param": None,
        "code": None,
        "task_id": name,
    }


def test_openai_failed_task_carries_reason_and_task_id(gateway_factory, driver):
    gw = gateway_factory(uploads=True)
    with gw.client() as http, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/v1/audio/transcriptions", files={"file": AUDIO})
        name = driver.wait_tj()["metadata"]["name"]
        driver.fail(name, "AudioTooLarge", "the audio is longer than allowed")
        response = pending.result(timeout=10)
    assert response.status_code == 413
    assert response.json() == {
        "error": {
            "message": "AudioTooLarge: the audio is longer than allowed",
            "type": "invalid_request_error",
            "param": None,
            "code": "AudioTooLarge",
            "task_id": name,
        }
    }


def _chunked(size: int, boundary: str = "b0undary"):
    """A multipart body with one file part of `size` bytes, sent without a Content-Length."""
    yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'.encode()
    for _ in range(size // 1024):
        yield b"\0" * 1024
    yield f"\r\n--{boundary}--\r\n".encode()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/", {"detail": "request body is larger than the limit of 4096 bytes"}),
        ("/v1/audio/transcriptions", {"error": {"message": "request body is larger than the limit of 4096 bytes",
                                                "type": "invalid_request_error", "param": None, "code": None}}),
    ],
)
def test_chunked_upload_over_the_limit_is_413_on_every_route(gateway_factory, driver, path, body):
    """No Content-Length: the limit trips while the body is read, inside FastAPI's own form parsing
    on /v1 (which must not turn it into a 400 parse error)."""
    gw = gateway_factory(uploads=True, max_upload_bytes=4096)
    with gw.client() as http:
        response = http.post(
            path, content=_chunked(10_000), headers={"content-type": "multipart/form-data; boundary=b0undary"}
        )
    assert response.status_code == 413, response.text
    assert response.json() == body
    assert driver.tjs() == []


def test_declared_length_over_the_limit_is_413_in_the_route_shape(gateway_factory):
    """The middleware refuses before any route runs, in the same shapes."""
    gw = gateway_factory(uploads=True, max_upload_bytes=4096)
    with gw.client() as http:
        plain = http.post("/", files={"file": ("big.wav", b"\0" * 10_000, "audio/wav")})
        openai = http.post("/v1/audio/transcriptions", files={"file": ("big.wav", b"\0" * 10_000, "audio/wav")})
    assert plain.status_code == 413 and plain.json() == {"detail": "request body is larger than the limit of 4096 bytes"}
    assert openai.status_code == 413 and openai.json()["error"]["message"] == plain.json()["detail"]


def test_unknown_routes_and_methods_keep_starlette_answers(http):
    assert http.get("/nowhere").status_code == 404 and http.get("/nowhere").json() == {"detail": "Not Found"}
    wrong = http.put("/tasks")
    assert wrong.status_code == 405 and wrong.json() == {"detail": "Method Not Allowed"}
    assert "GET" in wrong.headers["allow"]
    gone = http.post("/v1/audio/nowhere")
    assert gone.status_code == 404 and gone.json()["error"]["message"] == "Not Found"
