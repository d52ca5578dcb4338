"""The SSRF guard: refuses before connecting, pins the vetted address, follows every hop.

Only loopback servers are ever contacted. Targets such as 10.0.0.1 or
169.254.169.254 are numeric, so resolving them sends no traffic, and the guard
must refuse them before any connect; a hit counter on the loopback server proves
that refused loopback forms never reached it either.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpcore
import httpx
import pytest

from ifw.core import netguard
from ifw.core.netguard import Allowlist, DestinationNotAllowed, address_problem, check_url


class _Handler(BaseHTTPRequestHandler):
    hits: list[dict[str, str]] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).hits.append({"path": self.path, "host": self.headers.get("Host", "")})
        if self.path.startswith("/redirect-to/"):
            self.send_response(302)
            self.send_header("Location", "http://" + self.path.removeprefix("/redirect-to/"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _reset_hits():
    _Handler.hits.clear()


@pytest.mark.parametrize(
    "address, reason",
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("100.100.100.200", "carrier-grade NAT"),  # Alibaba Cloud metadata
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", ""),
        ("255.255.255.255", ""),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", ""),  # AWS metadata over IPv6 (ULA)
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "embeds IPv4 127.0.0.1"),
        ("::ffff:169.254.169.254", "embeds IPv4 169.254.169.254"),
        ("::ffff:10.1.2.3", "embeds IPv4 10.1.2.3"),
        ("64:ff9b::a9fe:a9fe", "embeds IPv4 169.254.169.254"),  # NAT64
        ("2002:7f00:1::", "embeds IPv4 127.0.0.1"),  # 6to4
    ],
)
def test_non_public_addresses_are_refused(address, reason):
    problem = address_problem(ipaddress.ip_address(address))
    assert problem, f"{address} must be refused"
    assert reason in problem


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address):
    assert address_problem(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/",
        "http://localhost:{port}/",  # a name that resolves to loopback
        "http://[::1]:{port}/",
        "http://0.0.0.0:{port}/",  # on Linux, connecting to 0.0.0.0 reaches loopback
        "http://2130706433:{port}/",  # 127.0.0.1 as a decimal integer
        "http://0x7f000001:{port}/",  # ... as hex
        "http://127.1:{port}/",  # ... in short form
        "http://[::ffff:127.0.0.1]:{port}/",  # ... IPv4-mapped IPv6
        "http://[::ffff:7f00:1]:{port}/",
    ],
)
def test_loopback_forms_refused_before_connecting(server, url):
    with netguard.guarded_client(timeout=2) as client:
        with pytest.raises(DestinationNotAllowed):
            client.get(url.format(port=server))
    assert _Handler.hits == [], "the guard let a request through to the loopback server"


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://100.100.100.200/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",  # refused by name, before any DNS lookup
        "http://192.168.0.1:8080/",
    ],
)
def test_private_and_metadata_targets_refused(url, monkeypatch):
    # Prove no connection is even attempted: the inner backend must never be asked.
    def forbidden(*args, **kwargs):
        raise AssertionError(f"connect attempted for {url}")

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", forbidden)
    with netguard.guarded_client(timeout=2) as client:
        with pytest.raises(DestinationNotAllowed):
            client.get(url)
    with pytest.raises(DestinationNotAllowed):
        check_url(url)


def test_allowlist_lets_loopback_through_and_pins_the_address(server):
    connected: list[str] = []

    class Recording(httpcore.SyncBackend):
        def connect_tcp(self, host, port, *args, **kwargs):
            connected.append(host)
            return super().connect_tcp(host, port, *args, **kwargs)

    transport = netguard.GuardedTransport(["127.0.0.0/8", "::1/128"])
    transport._pool._network_backend.inner = Recording()
    with httpx.Client(transport=transport) as client:
        response = client.get(f"http://localhost:{server}/x")
    assert response.status_code == 200 and response.text == "hello"
    # The socket went to the address that was checked, not to a second lookup of the name...
    assert connected and all(ipaddress.ip_address(host).is_loopback for host in connected)
    # ...while the server still saw the name in the Host header.
    assert _Handler.hits == [{"path": "/x", "host": f"localhost:{server}"}]


def test_allowlist_by_hostname(server):
    with netguard.guarded_client(["localhost"], timeout=2) as client:
        assert client.get(f"http://localhost:{server}/").status_code == 200
        # The name is allowed, not every loopback address.
        with pytest.raises(DestinationNotAllowed):
            client.get(f"http://127.0.0.1:{server}/")


def test_redirect_to_private_address_refused_on_the_hop(server, monkeypatch):
    real_connect = httpcore.SyncBackend.connect_tcp
    attempts: list[str] = []

    def only_loopback(self, host, port, *args, **kwargs):
        attempts.append(host)
        assert ipaddress.ip_address(host).is_loopback, f"tried to connect to {host}"
        return real_connect(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", only_loopback)
    with netguard.guarded_client(["127.0.0.1/32"], follow_redirects=True, timeout=2) as client:
        with pytest.raises(DestinationNotAllowed, match="169.254.169.254"):
            client.get(f"http://127.0.0.1:{server}/redirect-to/169.254.169.254/latest/meta-data/")
    assert [h["path"] for h in _Handler.hits] == ["/redirect-to/169.254.169.254/latest/meta-data/"]
    assert attempts == ["127.0.0.1"]


def test_async_client_guards_too(server):
    async def main():
        async with netguard.guarded_async_client(timeout=2) as client:
            with pytest.raises(DestinationNotAllowed):
                await client.get(f"http://localhost:{server}/")
            with pytest.raises(DestinationNotAllowed):
                await client.get("http://169.254.169.254/")
        async with netguard.guarded_async_client(["127.0.0.1"], timeout=2) as client:
            return await client.get(f"http://127.0.0.1:{server}/a")

    response = asyncio.run(main())
    assert response.status_code == 200 and response.text == "hello"
    assert [h["path"] for h in _Handler.hits] == ["/a"]


def test_refusal_is_not_a_transport_error():
    # Retry loops catch httpx.TransportError: a refused destination must not look transient.
    assert not issubclass(DestinationNotAllowed, httpx.TransportError)
    assert issubclass(DestinationNotAllowed, httpx.RequestError)


def test_allowlist_parsing():
    allow = Allowlist(["10.0.0.0/8", "uploads.ifw.svc.cluster.local", "*.internal.example", "[fd00::1]", " "])
    assert allow.allows_address(ipaddress.ip_address("10.2.3.4"))
    assert allow.allows_address(ipaddress.ip_address("fd00::1"))
    assert not allow.allows_address(ipaddress.ip_address("192.168.1.1"))
    assert allow.allows_host("Uploads.IFW.svc.cluster.local.")
    assert allow.allows_host("a.internal.example") and not allow.allows_host("internal.example.com")
    with pytest.raises(ValueError, match="neither a hostname nor a CIDR"):
        Allowlist(["10.0.0.0/33"])


def test_check_url_rejects_other_schemes():
    for url in ("file:///etc/passwd", "gopher://127.0.0.1/", "ftp://example.com/a.mp3"):
        with pytest.raises(DestinationNotAllowed, match="scheme"):
            check_url(url)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[tuple[int, str, list[str | None]]]:
    """HTTPS on 127.0.0.1 with a certificate for the name `localhost` only (from a throwaway CA)."""
    import ssl
    import subprocess

    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=ifw-test-ca")
    run("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=localhost")
    (d / "ext").write_text("subjectAltName=DNS:localhost\n")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "srv.crt", "-days", "1", "-extfile", "ext")  # fmt: skip

    sni_seen: list[str | None] = []
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(d / "srv.crt", d / "srv.key")
    ctx.sni_callback = lambda sock, name, _ctx: sni_seen.append(name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], str(d / "ca.crt"), sni_seen
    httpd.shutdown()
    httpd.server_close()


def test_tls_keeps_sni_and_certificate_check_on_the_name(tls_server):
    import ssl

    port, ca, sni_seen = tls_server
    trust = ssl.create_default_context(cafile=ca)
    with netguard.guarded_client(["localhost"], verify=trust, timeout=5) as client:
        response = client.get(f"https://localhost:{port}/tls")
    assert response.status_code == 200 and response.text == "hello"
    # Connected to the vetted IP, yet the server was asked for `localhost` and its certificate checked for it.
    assert sni_seen[-1] == "localhost"
    assert _Handler.hits[-1] == {"path": "/tls", "host": f"localhost:{port}"}

    # The same server by IP: the certificate does not name 127.0.0.1, so verification must fail.
    with netguard.guarded_client(["127.0.0.1"], verify=trust, timeout=5) as client:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED|IP address mismatch"):
            client.get(f"https://127.0.0.1:{port}/tls")
