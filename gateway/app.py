"""The gateway's FastAPI application: `create_app()`, and `python -m ifw.gateway` to serve it."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ifw.core import kube as kube_client
from ifw.core.redact import RedactingFilter
from ifw.gateway import errors, routes_api, routes_openai, routes_ops
from ifw.gateway.config import GatewaySettings, get_settings
from ifw.gateway.kube import Kube
from ifw.gateway.middleware import GatewayMiddleware
from ifw.gateway.models import OpenAIText, TranscribeFields, TranscribeRequest
from ifw.gateway.service import Service
from ifw.gateway.uploads import Uploads
from ifw.gateway.watch import TjWatch

log = logging.getLogger("ifw.gateway")

DESCRIPTION = """\
The Insanely Fast Whisper API, backed by Kubernetes `TranscriptionJob`s.

`POST /` keeps the original API's fields, defaults and response shapes and
checks every field (unknown ones are ignored, as the original ignores them, and
named in the `X-Ignored-Fields` header); `GET /status/{task_id}` keeps the output
until the task's TTL. Send `x-admin-api-key` when the server has a key.
OpenAI-compatible routes live under `/v1/audio` and `/v1/models`.
"""


def _upload_schema() -> dict[str, Any]:
    """POST / as multipart: the JSON fields as form fields, a file instead of the url."""
    schema = TranscribeFields.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)
    props = schema["properties"]
    props["webhook"] = {
        "type": "string",
        "description": 'JSON text: {"url": "https://...", "header": {"Name": "value"}}',
    }
    props["file"] = {"type": "string", "format": "binary", "description": "The audio file (or send url)."}
    props["url"] = {"type": "string", "maxLength": 2048, "description": "http(s) URL of the audio (or send file)."}
    schema["title"] = "TranscribeUpload"
    schema.pop("additionalProperties", None)
    return schema


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    full = TranscribeRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(full.pop("$defs", {}))
    components["TranscribeRequest"] = full
    components["TranscribeUpload"] = _upload_schema()
    components["OpenAIText"] = OpenAIText.model_json_schema()
    app.openapi_schema = spec
    return spec


def create_app(settings: GatewaySettings | None = None, kube: Kube | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One pooled connection per worker thread, plus one per namespace watch.
        pool = settings.kube_threads + len(settings.namespaces())
        client = kube or Kube(
            kube_client.api_client(pool_size=pool, component="gateway"), settings.kube_threads,
            settings.kube_timeout_seconds,
        )  # fmt: skip
        watch = TjWatch(client, settings.namespaces(), settings.watch_server_timeout)
        uploads = Uploads(settings.upload_dir, settings.internal_url)
        watch.listeners.append(uploads.on_event)
        app.state.service = Service(settings, client, watch, uploads)
        watch.start()
        if await watch.wait_synced(10):
            uploads.sweep(watch.objects)
        else:
            log.warning("the TranscriptionJob watch has not synced yet; /readyz says so until it does")
        try:
            yield
        finally:
            watch.stop()
            if kube is None:
                client.api_client.close()

    app = FastAPI(title="ifw gateway", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.include_router(routes_api.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_ops.router)
    errors.install(app)
    app.add_middleware(GatewayMiddleware, settings=settings)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the task_id when the record names one (extra={"task_id": ...})."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if task_id := getattr(record, "task_id", None):
            entry["task_id"] = task_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class GatewayServer(uvicorn.Server):
    """uvicorn's server, whose shutdown (SIGTERM, SIGINT) first answers every waiting sync
    request (503 with its task_id; the task goes on), so the process exits in bounded time
    instead of waiting on requests that may wait for hours. uvicorn then stops accepting,
    closes the idle connections and waits up to shutdown_timeout_seconds for the rest."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        service = getattr(self.app.state, "service", None)  # None before the lifespan made it
        if service is not None:
            service.drain()  # sets a flag only: the listeners close before anything runs again
        await super().shutdown(sockets)


def server(app: FastAPI, settings: GatewaySettings, **config: Any) -> GatewayServer:
    """The server `python -m ifw.gateway` runs (the tests run the same in a thread)."""
    options: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
                               "log_config": None, "timeout_graceful_shutdown": settings.shutdown_timeout_seconds}  # fmt: skip
    return GatewayServer(uvicorn.Config(app, **{**options, **config}), app)


def setup_logging(settings: GatewaySettings) -> None:
    handler = logging.StreamHandler()
    # Filters on the handler see every record it writes, uvicorn's access log (request paths) included.
    handler.addFilter(RedactingFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)


def main() -> None:
    settings = get_settings()
    setup_logging(settings)
    # The client logs whole request and response bodies at debug level: Secrets included.
    logging.getLogger("kubernetes").setLevel(max(logging.INFO, logging.getLogger().level))
    app = create_app(settings)
    gc.freeze()  # start-up objects (imports, schemas) leave the GC's scans: shorter pauses under load
    server(app, settings).run()
