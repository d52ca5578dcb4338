"""Answers that start before their body is known: keep-alive JSON and server-sent events.

A sync request waits as long as its job runs, like the original API. Proxies and load
balancers cut connections that stay silent (often after 60 s), so a JSON answer that is not
ready after `keepalive_seconds` starts as a 200 and sends a space every `keepalive_seconds`
until the JSON body (JSON allows leading whitespace). The status code is sent by then: an error
after that point arrives in the body, shaped as it would have been (errors.late_body), with a
`status` other than "completed". Quick answers keep their real status codes.

The client leaving is noticed by the work itself (Service.wait listens for it), so these
responses never read from the connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ifw.gateway.errors import late_body


class PushedResponse(Response):
    """A 200 whose body an async iterator produces piece by piece (chunked transfer encoding)."""

    def __init__(self, chunks: AsyncIterator[bytes], media_type: str, headers: dict[str, str] | None = None):
        self.chunks = chunks
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await self.chunks.aclose()  # type: ignore[attr-defined]
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _json(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


async def json_answer(
    path: str, work: Awaitable[dict[str, Any]], keepalive: float, headers: dict[str, str] | None = None
) -> Response:
    """`work`'s dict as JSON: a plain response when it is ready (or fails) within `keepalive`
    seconds (0: however long it takes), else a 200 that sends a space every `keepalive` seconds until it is."""
    task = asyncio.ensure_future(work)
    try:
        # shield: running out of time must not cancel the work, only change how it is answered.
        body = await asyncio.wait_for(asyncio.shield(task), keepalive or None)
    except TimeoutError:
        return PushedResponse(_spaces_then(path, task, keepalive), "application/json", headers)
    except BaseException:
        task.cancel()
        raise
    return JSONResponse(body, headers=headers)


async def _spaces_then(path: str, task: asyncio.Future[dict[str, Any]], every: float) -> AsyncIterator[bytes]:
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=every)
            if not done:
                yield b" "
        try:
            body = task.result()
        except Exception as exc:  # noqa: BLE001 - the status is sent: the error goes in the body
            body = late_body(path, exc)
        yield _json(body)
    finally:
        if not task.done():
            task.cancel()


def sse(event: dict[str, Any]) -> bytes:
    """One server-sent event carrying `event` as JSON (what OpenAI's SDKs parse)."""
    return b"data: " + _json(event) + b"\n\n"


SSE_KEEPALIVE = b": keep-alive\n\n"  # a comment: clients skip it, proxies see traffic
