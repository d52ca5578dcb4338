"""A loopback origin for the runs whose API calls are recorded: audio to fetch and webhooks to take."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Origin:
    """GET /speech.wav serves `audio`; GET /slow.wav is held until `release` is set (so a job can be
    cancelled mid-fetch), then 404 like any other path, or, with `slow_serves_audio`, serves `audio`
    at once; POST (a webhook) gets 204."""

    audio: bytes = b""
    slow_serves_audio: bool = False
    fetching: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> Origin:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()  # a fetch still held must not keep its thread
        self.server.shutdown()


def _handler(origin: Origin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if origin.audio and (self.path == "/speech.wav" or self.path == "/slow.wav" and origin.slow_serves_audio):
                self.send_response(200)
                self.send_header("content-type", "audio/wav")
                self.send_header("content-length", str(len(origin.audio)))
                self.end_headers()
                self.wfile.write(origin.audio)
                return
            if self.path == "/slow.wav":
                origin.fetching.set()
                origin.release.wait(300)
            try:
                self.send_error(404)
            except (BrokenPipeError, ConnectionResetError):  # the cancelled fetcher is gone by then
                pass

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    return Handler
