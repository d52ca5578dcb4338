"""An early, DNS-free SSRF check of user-given URLs, for a clear 4xx at request time.

The real guard runs where the connection is made (the runner and the
operator resolve and vet every address, see ifw.core.netguard); this one
only refuses what is visibly internal in the URL itself: literal private,
loopback or link-local addresses, localhost and metadata hostnames.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

from ifw.core.netguard import METADATA_HOSTNAMES, Allowlist, address_problem


def url_problem(url: str, allowlist: Allowlist) -> str | None:
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    if not host:
        return "has no host"
    if allowlist.allows_host(host):
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return "points at localhost"
    if host in METADATA_HOSTNAMES:
        return "points at a cloud metadata service"
    address = _literal_address(host)
    if address is None:
        return None  # a name: judged by the runner once resolved
    if allowlist.allows_address(address):
        return None
    problem = address_problem(address)
    if problem is None:
        return None
    return problem if problem.startswith("embeds") else f"points at a {problem}"


# Decimal, octal, hex and short IPv4 forms (2130706433, 0x7f.1, 127.1) that resolvers accept.
_IPV4_FORMS = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$")


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host that is no name stands for, as getaddrinfo would read it."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _IPV4_FORMS.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None
