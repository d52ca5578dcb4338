"""Task ids over HTTP against the real apiserver: no id can take the name another id maps to,
and ids (and the URLs and webhook headers stored with them) carry no control or invisible
characters (bidi overrides, zero-width spaces) that would make two ids look alike."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from ifw.core.contract import ANNOTATION_TASK_ID
from ifw.gateway.taskids import object_name

pytestmark = pytest.mark.cluster

URL = "https://audio.example.com/talk.mp3"
HOOK = {"url": "https://hooks.example.com/done"}


def submit(http, task_id: str, **fields):
    return http.post("/", json={"url": URL, "is_async": True, "webhook": HOOK, "managed_task_id": task_id, **fields})


def names(driver) -> dict[str, str]:
    """object name -> the task id it keeps (its annotation, else its name)."""
    return {
        tj["metadata"]["name"]: (tj["metadata"].get("annotations") or {}).get(ANNOTATION_TASK_ID, tj["metadata"]["name"])
        for tj in driver.tjs()
    }


@pytest.mark.parametrize("first", ["squatter", "victim"])
def test_an_id_cannot_take_the_name_another_id_maps_to(http, driver, first):
    """"Foo Bar" maps to foo-bar-<hash>; a client that sends that very name as its id, before
    or after, gets a task of its own, and neither id answers 409 or finds the other's task."""
    victim = "Foo Bar"
    squatter = object_name(victim)  # what the attacker sends: foo-bar-55282c1820
    assert squatter != victim
    order = [squatter, victim] if first == "squatter" else [victim, squatter]
    for task_id in order:
        response = submit(http, task_id)
        assert response.status_code == 200, response.text
        assert response.json()["task_id"] == task_id
    held = names(driver)
    assert sorted(held.values()) == sorted([victim, squatter]) and len(held) == 2
    assert held[squatter] == victim  # the hashed name is the victim's, as before
    for task_id in order:
        status = http.get(f"/status/{quote(task_id, safe='')}")
        assert status.status_code == 200 and status.json()["task_id"] == task_id
        again = submit(http, task_id)  # the same id twice is still 409
        assert (again.status_code, again.json()) == (409, {"detail": f"Task {task_id} already exists"})
    assert sorted(http.get("/tasks").json()["tasks"]) == sorted(order)
    assert http.delete(f"/cancel/{quote(victim, safe='')}").json() == {"status": "cancelled"}
    assert http.get(f"/status/{squatter}").json()["task_id"] == squatter  # the other task is untouched


def test_ids_that_are_names_keep_their_name(http, driver):
    """A DNS-1123 label id is its own name (kubectl get tj talk-7), unless it ends like a hash."""
    assert submit(http, "talk-7").status_code == 200
    assert submit(http, "rec-1733011200").status_code == 200  # "-" + 10 hex digits: hashed
    held = names(driver)
    assert held["talk-7"] == "talk-7"
    [hashed] = [n for n, t in held.items() if t == "rec-1733011200"]
    assert hashed.startswith("rec-1733011200-") and len(hashed) == len("rec-1733011200-") + 10
    assert http.get("/status/rec-1733011200").json()["task_id"] == "rec-1733011200"
    assert http.get(f"/status/{hashed}").status_code == 404  # its name is no id of it


def test_a_name_held_by_an_object_of_no_id_is_no_task(http, driver):
    """A TranscriptionJob made with kubectl under the name an id hashes to is not that id's task."""
    name = object_name("Meeting A")
    driver.custom.create_namespaced_custom_object(
        "ifw.dev", "v1alpha1", driver.namespace, "transcriptionjobs",
        {"apiVersion": "ifw.dev/v1alpha1", "kind": "TranscriptionJob", "metadata": {"name": name},
         "spec": {"audio": {"url": URL}}},
    )  # fmt: skip
    assert http.get(f"/status/{quote('Meeting A')}").json() == {"detail": "Task not found"}
    assert http.delete(f"/cancel/{quote('Meeting A')}").status_code == 404
    assert driver.get(name) is not None


INVISIBLE = {
    "rlo": "\u202e",  # RIGHT-TO-LEFT OVERRIDE: "call-\u202e3218" shows as call-8123
    "lre": "\u202a",
    "zwsp": "\u200b",
    "zwnj": "\u200c",
    "zwj": "\u200d",
    "lrm": "\u200e",
    "rlm": "\u200f",
    "lri": "\u2066",
    "rli": "\u2067",
    "fsi": "\u2068",
    "pdi": "\u2069",
    "bom": "\ufeff",
    "soft-hyphen": "\u00ad",
    "word-joiner": "\u2060",
    "del": "\x7f",
    "nel": "\x85",
    "esc": "\x1b",
}


@pytest.mark.parametrize("char", INVISIBLE.values(), ids=INVISIBLE.keys())
def test_control_and_invisible_characters_in_ids_are_refused_naming_the_field(http, driver, char):
    task_id = f"call-{char}8812"
    response = submit(http, task_id)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "managed_task_id"]
    assert f"U+{ord(char):04X}" in error["msg"] and char not in response.text
    # A sync request, and multipart: the same refusal.
    sync = http.post("/", json={"url": URL, "managed_task_id": task_id})
    assert sync.status_code == 422 and sync.json()["detail"][0]["loc"] == ["body", "managed_task_id"]
    form = http.post("/", data={"managed_task_id": task_id}, files={"file": ("a.wav", b"RIFF", "audio/wav")})
    assert form.status_code == 422 and "managed_task_id" in str(form.json()["detail"]), form.text
    assert driver.tjs() == []
    # No request can have made such an id: /status and /cancel answer the unknown task's 404.
    for path in (f"/status/{quote(task_id, safe='')}", f"/cancel/{quote(task_id, safe='')}"):
        answer = http.request("DELETE" if path.startswith("/cancel") else "GET", path)
        assert (answer.status_code, answer.json()) == (404, {"detail": "Task not found"})


def test_printable_unicode_ids_still_work(http, driver):
    """Letters of any script, spaces and punctuation are ids; only controls and invisibles are not."""
    for task_id in ("Kundengespräch 42 (Zürich)", "שיחה 7", "通话/8812", "tab-free — dash"):
        response = submit(http, task_id)
        assert response.status_code == 200, response.text
        assert http.get(f"/status/{quote(task_id, safe='')}").json()["task_id"] == task_id


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"url": "https://audio.example.com/\u202emp3.exe"}, ["body", "url"]),
        ({"url": "https://audio.example.com/a\x01.mp3"}, ["body", "url"]),
        ({"webhook": {"url": "https://hooks.example.com/\u200bdone"}}, ["body", "webhook", "url"]),
        ({"webhook": {"url": "https://hooks.example.com/done", "header": {"X-Token": "a\x01b"}}}, ["body", "webhook", "header"]),
        ({"webhook": {"url": "https://hooks.example.com/done", "header": {"X-Token": "a\u2066b"}}}, ["body", "webhook", "header"]),
    ],
    ids=["url-rlo", "url-control", "webhook-url-zwsp", "webhook-header-control", "webhook-header-isolate"],
)
def test_urls_and_webhook_headers_carry_no_control_or_invisible_characters(http, driver, fields, loc):
    """What is stored with the task (spec.audio.url, spec.webhook.url, the headers Secret) and
    sent on (the fetch, the webhook POST) is refused too, naming its field."""
    response = submit(http, "odd-input", **fields)
    assert response.status_code == 422, response.text
    assert [d["loc"] for d in response.json()["detail"]] == [loc]
    assert driver.tjs() == []


def test_a_tab_in_a_webhook_header_value_is_still_allowed(http, driver):
    hook = {"url": "https://hooks.example.com/done", "header": {"X-Token": "a\tb"}}
    assert submit(http, "tabbed", webhook=hook).status_code == 200


def test_a_task_made_before_such_ids_were_hashed_is_still_found_by_its_id(http, driver):
    """An earlier gateway named the job after an id like rec-1733011200 itself: after the upgrade
    /status still finds it by that id (and only that id)."""
    from ifw.crds.transcriptionjob import API_VERSION, GROUP, KIND, PLURAL, VERSION

    old_id = "rec-1733011200"
    assert object_name(old_id) != old_id  # hashed now
    body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": old_id}, "spec": {"audio": {"url": URL}}}
    driver.custom.create_namespaced_custom_object(GROUP, VERSION, driver.namespace, PLURAL, body)
    assert http.get(f"/status/{old_id}").status_code == 200
    assert http.get("/status/rec-1733011201").status_code == 404
