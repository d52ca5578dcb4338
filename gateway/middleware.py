"""ASGI middleware: API-key auth, request-size limits and request metrics.

Plain ASGI (no BaseHTTPMiddleware) so that a thousand long-waiting requests
cost no extra tasks or buffering.
"""

from __future__ import annotations

import hmac
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ifw.gateway import metrics
from ifw.gateway.config import GatewaySettings
from ifw.gateway.errors import ApiError, BadContentLength, BodyTooLarge, Unauthorized, early_response

# Open without a key: probes, metrics, and the upload route (it checks each upload's own token).
OPEN_PATHS = ("/healthz", "/readyz", "/metrics")
OPEN_PREFIXES = ("/internal/uploads/",)
API_KEY_HEADER = b"x-admin-api-key"


class Keys:
    """The configured keys and the namespace each one opens."""

    def __init__(self, settings: GatewaySettings):
        self.entries: list[tuple[bytes, str]] = []
        if settings.admin_key is not None:
            self.entries.append((settings.admin_key.get_secret_value().encode(), settings.namespace))
        for namespace, key in settings.tenant_keys.items():
            self.entries.append((key.get_secret_value().encode(), namespace))
        self.default_namespace = settings.namespace

    @property
    def required(self) -> bool:
        return bool(self.entries)

    def namespace_for(self, presented: bytes | None) -> str | None:
        if not self.entries:
            return self.default_namespace
        if presented is None:
            return None
        found = None
        for key, namespace in self.entries:  # compare with every key: timing says nothing about which
            if hmac.compare_digest(key, presented) and found is None:
                found = namespace
        return found


def _presented_key(headers: dict[bytes, bytes]) -> bytes | None:
    """x-admin-api-key (the original API), else a bearer token (what OpenAI SDKs send)."""
    key = headers.get(API_KEY_HEADER)
    if key is None:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and token:
            key = token.strip()
    return key


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, settings: GatewaySettings):
        self.app = app
        self.keys = Keys(settings)
        self.max_json = settings.max_json_bytes
        self.max_upload = settings.max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            metrics.REQUESTS.labels(template, scope["method"], str(status_holder["status"])).inc()
            metrics.REQUEST_SECONDS.labels(template, scope["method"]).observe(time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            limit = self._admit(scope)
        except ApiError as exc:
            await early_response(scope["path"], exc)(scope, receive, send)
            return

        received = 0
        started = {"response": False}

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # chunked bodies carry no Content-Length
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started["response"] = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:  # the app's handlers answer it; this is for reads outside them
            if not started["response"]:
                await early_response(scope["path"], exc)(scope, receive, send)

    def _admit(self, scope: Scope) -> int:
        """Set the request's namespace from its key and return its body size limit.
        Raises Unauthorized, BadContentLength or BodyTooLarge."""
        path: str = scope["path"]
        headers = dict(scope["headers"])
        state = scope.setdefault("state", {})
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            state["namespace"] = self.keys.default_namespace
        else:
            namespace = self.keys.namespace_for(_presented_key(headers))
            if namespace is None:
                raise Unauthorized()
            state["namespace"] = namespace
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        limit = self.max_upload if content_type == b"multipart/form-data" else self.max_json
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                raise BadContentLength() from None
            if too_big:
                raise BodyTooLarge(limit)
        return limit
