"""An early, DNS-free SSRF check of user-given URLs, for a clear 4xx at request time.

The real guard runs where the connection is made (the runner and the
operator resolve and vet every address, see ifw.core.netguard); this one
only refuses what is visibly internal in the URL itself: literal private,
loopback or link-local addresses, localhost and metadata hostnames.
"""

from __future__ import annotations

import ipaddress
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
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: judged by the runner once resolved
    if allowlist.allows_address(address):
        return None
    problem = address_problem(address)
    return f"points at a {problem}" if problem else None
