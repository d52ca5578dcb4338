"""spec.parallelism over HTTP (ifw's extension; the original's clients never send it): POST / as JSON
and multipart and the OpenAI SDK's extra_body carry it into the TranscriptionJob; bad values and
the combinations a sharded job cannot honour get a 422 naming the field, and create nothing."""

from __future__ import annotations

import httpx
import pytest

from tests.gateway.conftest import transcript

pytestmark = pytest.mark.cluster

KEY = "shards-key"
URL = "https://audio.example.com/meeting.mp3"


def finish(driver) -> dict:
    tj = driver.wait_tj()
    driver.succeed(tj["metadata"]["name"], transcript())
    return tj


@pytest.mark.parametrize("value", [3, "Auto", 1])
def test_rest_json_parallelism_reaches_the_spec(gw, driver, pool, value):
    with httpx.Client(base_url=gw.url, headers={"x-admin-api-key": KEY}, timeout=30) as http:
        pending = pool.submit(http.post, "/", json={"url": URL, "parallelism": value})
        tj = finish(driver)
        assert pending.result(timeout=15).status_code == 200
    assert tj["spec"]["parallelism"] == value


def test_multipart_takes_it_as_text(gw, driver, pool, wav):
    with httpx.Client(base_url=gw.url, headers={"x-admin-api-key": KEY}, timeout=30) as http:
        pending = pool.submit(http.post, "/", files={"file": ("a.wav", wav.read_bytes(), "audio/wav")},
                              data={"parallelism": "4"})  # fmt: skip
        assert finish(driver)["spec"]["parallelism"] == 4
        assert pending.result(timeout=15).status_code == 200


def test_openai_extra_body_takes_it(client, driver, pool, wav):
    def ask():
        with wav.open("rb") as f:
            return client.audio.transcriptions.create(model="whisper-1", file=f, extra_body={"parallelism": "Auto"})

    pending = pool.submit(ask)
    assert finish(driver)["spec"]["parallelism"] == "Auto"
    assert pending.result(timeout=15).text


@pytest.mark.parametrize(("body", "why"), [
    ({"parallelism": 0}, "from 1 to 64"),
    ({"parallelism": 65}, "from 1 to 64"),
    ({"parallelism": "auto"}, "or Auto"),
    ({"parallelism": 2, "multichannel": True}, "multichannel"),
    ({"parallelism": 2, "diarise_audio": True, "known_speakers": [{"name": "Alice", "url": URL}]}, "known_speakers"),
])  # fmt: skip
def test_bad_parallelism_is_a_422_naming_the_field(gw, driver, body, why):
    answer = httpx.post(f"{gw.url}/", json={"url": URL, **body}, headers={"x-admin-api-key": KEY}, timeout=30)
    assert answer.status_code == 422, answer.text
    [error] = answer.json()["detail"]
    assert error["loc"][-1] == "parallelism" and why in error["msg"], error
    assert driver.tjs() == []


def test_openai_bad_parallelism_names_it(gw, driver, wav):
    answer = httpx.post(f"{gw.url}/v1/audio/transcriptions", headers={"authorization": f"Bearer {KEY}"},
                        files={"file": ("a.wav", wav.read_bytes(), "audio/wav")}, data={"parallelism": "many"})  # fmt: skip
    assert answer.status_code == 422 and answer.json()["error"]["param"] == "parallelism", answer.text
    assert driver.tjs() == []
