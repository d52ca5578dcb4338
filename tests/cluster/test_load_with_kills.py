"""The outside probe's load-with-kills sequence, three rounds in a row on one `ifw local` stack.

Each round posts 40 async jobs with webhooks (a real Harvard sentence each), SIGKILLs the pool
worker once a quarter of them have reported and the operator once two thirds have, and then
waits: every job must end completed, and every job's webhook must reach the receiver as one
message (a redelivery after a kill may repeat it, but only with the same `webhook-id`, as the
Standard Webhooks spec lets a receiver de-duplicate). Before the fix of issue 19 one job in 40
stayed Assigned forever after such a round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.cluster.running import child_pid, ends_with_nothing_left, start_local
from tests.waiting import wait_for

SPEECH = Path(__file__).resolve().parents[3] / "shared" / "speech" / "harvard" / "spk1_snt1.wav"
JOBS = 40
ROUNDS = 3


class Receiver:
    """Webhook receiver on loopback: every delivery, by task id, with its webhook-id and status."""

    def __init__(self):
        self.deliveries: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                with receiver.lock:
                    receiver.deliveries[body["task_id"]].append((self.headers["webhook-id"], body["status"]))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def reported(self, ids: list[str]) -> int:
        with self.lock:
            return sum(1 for i in ids if self.deliveries.get(i))


def _kill_when(stack, receiver: Receiver, ids: list[str], count: int, module: str) -> None:
    wait_for(lambda: receiver.reported(ids) >= count, 600, f"{count} webhooks before killing {module}", interval=0.2)
    pid = child_pid(stack, module)
    assert pid, f"no {module} process to kill"
    os.kill(pid, signal.SIGKILL)


@pytest.mark.cluster
@pytest.mark.model
def test_jobs_all_end_and_each_webhook_is_one_message_while_the_worker_and_the_operator_are_killed(tmp_path):
    speech = SPEECH.read_bytes()
    receiver = Receiver()
    stack = start_local(tmp_path, "--allow-webhook-host", "127.0.0.1")
    hook = json.dumps({"url": receiver.url})
    try:
        with httpx.Client(base_url=stack.gateway, timeout=60) as http:
            for round_ in range(ROUNDS):
                started = time.monotonic()
                ids = []
                for i in range(JOBS):
                    answer = http.post("/", data={"is_async": "true", "webhook": hook,
                                                  "managed_task_id": f"round{round_}-job{i}"},
                                       files={"file": ("speech.wav", speech, "audio/wav")})  # fmt: skip
                    assert answer.status_code == 200, answer.text
                    ids.append(answer.json()["task_id"])
                _kill_when(stack, receiver, ids, JOBS // 4, "ifw.runner")
                _kill_when(stack, receiver, ids, 2 * JOBS // 3, "ifw.operator")

                def states() -> dict[str, str]:
                    return {i: http.get(f"/status/{i}").json()["status"] for i in ids}

                def all_reported() -> bool:
                    return receiver.reported(ids) == JOBS and "processing" not in states().values()

                wait_for(all_reported, 600, f"round {round_}: every job to end and report", interval=1)
                ended = states()
                failed = {i: http.get(f"/status/{i}").json() for i, s in ended.items() if s != "completed"}
                assert not failed, {i: (f["status"], f.get("reason"), f.get("message")) for i, f in failed.items()}
                with receiver.lock:
                    for i in ids:
                        messages = {webhook_id for webhook_id, _ in receiver.deliveries[i]}
                        assert len(messages) == 1, (i, receiver.deliveries[i])
                        assert {status for _, status in receiver.deliveries[i]} == {"completed"}
                    repeats = sum(len(receiver.deliveries[i]) - 1 for i in ids)
                print(f"round {round_}: {JOBS} jobs in {time.monotonic() - started:.0f} s, "
                      f"{repeats} redeliveries of a message already delivered")  # fmt: skip
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.process.send_signal(signal.SIGTERM)
        try:
            stack.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            stack.process.kill()
        receiver.server.shutdown()
    ends_with_nothing_left(stack, timeout=30)
