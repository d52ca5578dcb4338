"""SSRF guard for every outbound request the project makes on a user's behalf.

The runner fetches `spec.audio.url` and the operator POSTs to `spec.webhook.url`:
both are chosen by whoever may create a TranscriptionJob, and both run inside
the cluster, next to the apiserver, other services and the cloud metadata
endpoint. So by default only public addresses may be contacted.

How it holds:
- the check runs on the *resolved* addresses (getaddrinfo), so hostnames,
  decimal/octal/hex IPv4 forms and IPv4-mapped/6to4/NAT64 IPv6 addresses are all
  judged by the address they really reach;
- the check runs inside the HTTP client's network backend, at connect time, so
  every connection is checked, including each redirect hop;
- the connection is made to the very address that was checked (no second DNS
  lookup that a rebinding DNS server could answer differently), while the URL's
  hostname still goes into the Host header, SNI and certificate check.

`guarded_client()` / `guarded_async_client()` build httpx clients with the guard;
the operator (async, kopf) uses the latter. An allowlist of hostnames or CIDRs
(settings.fetch_allowlist) lets chosen private destinations through, such as an
in-cluster upload service, or 127.0.0.0/8 in tests.
"""

from __future__ import annotations

import ipaddress
import socket
import typing
from collections.abc import Iterable, Sequence

import anyio
import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Hostnames of cloud metadata services. Their addresses are link-local or
# private and already refused; naming them makes the refusal explicit even
# where a resolver maps them somewhere unexpected.
METADATA_HOSTNAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.com",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
        "metadata.platformequinix.com",
    }
)

# Ranges refused although Python's `is_global` may call (parts of) them global,
# or which we want named in the error message.
_EXTRA_BLOCKED: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (ipaddress.ip_network("100.64.0.0/10"), "carrier-grade NAT (shared address space)"),
    (ipaddress.ip_network("192.0.0.0/24"), "IETF protocol assignments (incl. Oracle Cloud metadata)"),
    (ipaddress.ip_network("198.18.0.0/15"), "benchmarking"),
    (ipaddress.ip_network("fd00:ec2::/32"), "AWS metadata (IPv6)"),
)
# IPv6 prefixes that embed an IPv4 address in their last 32 bits (NAT64).
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


class DestinationNotAllowed(httpx.RequestError):
    """The guard refused a destination: a private, loopback, link-local, metadata... address.

    A subclass of httpx.RequestError (not TransportError): callers that retry
    transient network errors must not retry this one.
    """

    def __init__(self, host: str, reason: str, address: str | None = None):
        self.host = host
        self.address = address
        self.reason = reason
        where = f"{host} ({address})" if address and address != host else host
        super().__init__(f"destination {where} is not allowed: {reason}")


class Allowlist:
    """Hostnames (exact, or `*.suffix`) and CIDRs that may be contacted although not public."""

    def __init__(self, entries: Iterable[str] = ()):
        self.hosts: set[str] = set()
        self.suffixes: list[str] = []
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                # A bare address counts as a /32 (/128) network.
                self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            if entry.startswith("*."):
                self.suffixes.append(entry[1:])
            elif "/" in entry or ":" in entry:
                raise ValueError(f"fetch allowlist entry {raw!r} is neither a hostname nor a CIDR")
            else:
                self.hosts.add(entry.rstrip("."))

    def allows_host(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self.hosts or any(host.endswith(s) for s in self.suffixes)

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in net for net in self.networks if net.version == address.version)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that an IPv6 address stands for, where it embeds one."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client address
    if any(address in net for net in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    # IPv4-compatible (deprecated ::a.b.c.d); :: and ::1 are judged as themselves.
    if int(address) >> 32 == 0 and int(address) > 1:
        return ipaddress.IPv4Address(int(address))
    return None


def address_problem(address: IPAddress) -> str | None:
    """Why `address` must not be contacted, or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return "IPv6 address with a zone (link-local)"
        inner = _embedded_ipv4(address)
        if inner is not None:
            problem = address_problem(inner)
            return f"embeds IPv4 {inner}: {problem}" if problem else None
    checks = (
        (address.is_unspecified, "unspecified address"),
        (address.is_loopback, "loopback address"),
        (address.is_link_local, "link-local address (incl. cloud metadata 169.254.169.254)"),
        (address.is_multicast, "multicast address"),
        (address.is_private, "private address"),
        (address.is_reserved, "reserved address"),
    )
    for hit, reason in checks:
        if hit:
            return reason
    for net, reason in _EXTRA_BLOCKED:
        if address.version == net.version and address in net:
            return reason
    if not address.is_global:
        return "not a globally routable address"
    return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """All addresses `host` resolves to (TCP), in resolver order, de-duplicated."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return _addresses(infos)


def _addresses(infos: Sequence[tuple[typing.Any, ...]]) -> list[IPAddress]:
    seen: dict[IPAddress, None] = {}
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            seen.setdefault(ipaddress.ip_address(sockaddr[0]), None)
    return list(seen)


def vet_name(host: str, allowlist: Allowlist) -> bool:
    """Judge the hostname before any DNS lookup; True when the allowlist names it."""
    name = host.lower().rstrip(".")
    if allowlist.allows_host(name):
        return True
    if name in METADATA_HOSTNAMES:
        raise DestinationNotAllowed(host, "cloud metadata hostname")
    return False


def vet(host: str, addresses: Sequence[IPAddress], allowlist: Allowlist) -> list[IPAddress]:
    """Refuse the destination unless every address it resolved to may be contacted.

    All must pass, not just one: a name that resolves to both a public and a
    private address is refused rather than raced.
    """
    if vet_name(host, allowlist):
        return list(addresses)
    if not addresses:
        raise DestinationNotAllowed(host, "resolved to no IPv4/IPv6 address")
    for address in addresses:
        if allowlist.allows_address(address):
            continue
        problem = address_problem(address)
        if problem:
            # Each caller names the setting that would allow it (the runner's and the operator's differ).
            raise DestinationNotAllowed(host, problem, str(address))
    return list(addresses)


def _dns_error(host: str, error: Exception) -> httpcore.ConnectError:
    return httpcore.ConnectError(f"DNS lookup failed for {host!r}: {error}")


class GuardedBackend(httpcore.NetworkBackend):
    """Resolves, vets, then connects to a vetted address (sync)."""

    def __init__(self, allowlist: Allowlist, inner: httpcore.NetworkBackend | None = None):
        self.allowlist = allowlist
        self.inner = inner or httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        vet_name(host, self.allowlist)  # before DNS: a metadata name is not even looked up
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError) as error:
            raise _dns_error(host, error) from error
        last: Exception | None = None
        for address in vet(host, addresses, self.allowlist):
            try:
                return self.inner.connect_tcp(str(address), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last = error  # try the next vetted address, like create_connection does
        raise last or httpcore.ConnectError(f"{host!r} resolved to no address")

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise DestinationNotAllowed(path, "unix sockets are not allowed")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


class AsyncGuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, vets, then connects to a vetted address (asyncio or trio)."""

    def __init__(self, allowlist: Allowlist, inner: httpcore.AsyncNetworkBackend | None = None):
        self.allowlist = allowlist
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        vet_name(host, self.allowlist)
        try:
            with anyio.fail_after(timeout):
                infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError as error:
            raise httpcore.ConnectTimeout(f"DNS lookup for {host!r} timed out") from error
        except (OSError, UnicodeError) as error:
            raise _dns_error(host, error) from error
        last: Exception | None = None
        for address in vet(host, _addresses(infos), self.allowlist):
            try:
                return await self.inner.connect_tcp(str(address), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last = error
        raise last or httpcore.ConnectError(f"{host!r} resolved to no address")

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise DestinationNotAllowed(path, "unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def _pool_kwargs(verify: typing.Any, limits: httpx.Limits) -> dict[str, typing.Any]:
    return {
        "ssl_context": httpx.create_ssl_context(verify=verify, trust_env=False),
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
    }


class GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport with the guarded network backend (never a proxy, never a unix socket)."""

    def __init__(self, allowlist: Iterable[str] | Allowlist = (), verify: typing.Any = True,
                 limits: httpx.Limits = httpx.Limits(max_connections=10)):
        super().__init__(verify=verify, trust_env=False, limits=limits)
        self.allowlist = allowlist if isinstance(allowlist, Allowlist) else Allowlist(allowlist)
        # httpx builds its pool without a network_backend argument; rebuild it with ours.
        self._pool = httpcore.ConnectionPool(
            network_backend=GuardedBackend(self.allowlist), **_pool_kwargs(verify, limits)
        )


class AsyncGuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, allowlist: Iterable[str] | Allowlist = (), verify: typing.Any = True,
                 limits: httpx.Limits = httpx.Limits(max_connections=10)):
        super().__init__(verify=verify, trust_env=False, limits=limits)
        self.allowlist = allowlist if isinstance(allowlist, Allowlist) else Allowlist(allowlist)
        self._pool = httpcore.AsyncConnectionPool(
            network_backend=AsyncGuardedBackend(self.allowlist), **_pool_kwargs(verify, limits)
        )


def guarded_client(allowlist: Iterable[str] | Allowlist = (), **kwargs: typing.Any) -> httpx.Client:
    """An httpx.Client that can reach only public addresses (plus the allowlist).

    Environment proxies are ignored (a proxy would resolve and connect on our
    behalf, out of the guard's sight). Redirects are not followed unless the
    caller asks; when followed, each hop is checked at connect time. `verify`
    (True, a CA bundle path or an SSLContext) goes to the transport.
    """
    kwargs.setdefault("follow_redirects", False)
    transport = GuardedTransport(allowlist, verify=kwargs.pop("verify", True))
    return httpx.Client(transport=transport, trust_env=False, **kwargs)


def guarded_async_client(allowlist: Iterable[str] | Allowlist = (), **kwargs: typing.Any) -> httpx.AsyncClient:
    """The async twin of guarded_client (the operator's webhook sender uses it)."""
    kwargs.setdefault("follow_redirects", False)
    transport = AsyncGuardedTransport(allowlist, verify=kwargs.pop("verify", True))
    return httpx.AsyncClient(transport=transport, trust_env=False, **kwargs)


def check_url(url: str, allowlist: Iterable[str] | Allowlist = ()) -> list[IPAddress]:
    """Validate a URL up front (scheme, host, resolved addresses) without connecting.

    Useful to refuse early with a clear message (e.g. the gateway on submit);
    the connect-time check in the transport is still what protects.
    """
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https"):
        raise DestinationNotAllowed(url, f"scheme {parsed.scheme!r} is not http or https")
    if not parsed.host:
        raise DestinationNotAllowed(url, "URL has no host")
    lists = allowlist if isinstance(allowlist, Allowlist) else Allowlist(allowlist)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    vet_name(parsed.host, lists)
    try:
        addresses = resolve(parsed.host, port)
    except (OSError, UnicodeError) as error:
        raise DestinationNotAllowed(parsed.host, f"DNS lookup failed: {error}") from error
    return vet(parsed.host, addresses, lists)
