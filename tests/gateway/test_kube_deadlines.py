"""The gateway's two deadlines for a Kubernetes call: waiting for a free connection, then the answer.

A burst queues for the gateway's kube threads. A call's answer deadline starts when it is sent:
counted from the start of its wait, a call sent late was abandoned while the apiserver still
carried it out (bench.gateway's 10,000 sync requests: 21 creates done whose clients were told 503,
whose retries then got 409). A call that gets no thread in time was never sent: 503, safe to retry.
"""

from __future__ import annotations

import threading
import time

import anyio
import pytest
from kubernetes import client

from ifw.gateway.kube import Kube, KubeUnavailable


def _kube(threads: int, timeout: float) -> Kube:
    return Kube(client.ApiClient(), threads=threads, timeout=timeout)


def test_a_call_that_waited_for_a_thread_still_has_its_whole_deadline_once_sent():
    kube = _kube(threads=1, timeout=1.0)
    finished: list[int] = []

    def slow(i: int) -> int:  # an apiserver taking 0.7 s per call
        time.sleep(0.7)
        finished.append(i)
        return i

    async def both() -> list[int]:
        answers: list[int] = []

        async def one(i: int) -> None:
            answers.append(await kube.call(slow, i))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 1)
            tg.start_soon(one, 2)
        return answers

    # The second call waits 0.7 s for the one thread, then needs 0.7 s of its own: 1.4 s > 1.0 s.
    assert sorted(anyio.run(both)) == [1, 2]
    assert sorted(finished) == [1, 2]


def test_a_call_that_gets_no_thread_in_time_is_never_sent():
    kube = _kube(threads=1, timeout=0.3)
    release = threading.Event()
    sent: list[str] = []

    def hold() -> None:
        sent.append("hold")
        release.wait(5)

    def never() -> None:
        sent.append("never")

    async def scenario() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_swallow, kube.call(hold, timeout=2.0))
            await anyio.sleep(0.05)
            with pytest.raises(KubeUnavailable, match="no free connection"):
                await kube.call(never)
            release.set()

    anyio.run(scenario)
    assert sent == ["hold"]


async def _swallow(call) -> None:
    await call
