"""A network map peer's advertised endpoints, parsed and ranked for the path layer.

The path layer (:mod:`embedmesh.paths`) pings every candidate and keeps the best proven one; the
order here is the one a wireguard-only peer (no disco) is tried in, and the order pings go out.
"""

from __future__ import annotations

import ipaddress

from embedmesh.hostport import split_host_port

Endpoint = tuple[str, int]


def parse_endpoint(text: str) -> Endpoint | None:
    """``"1.2.3.4:5"`` / ``"[v6]:5"`` to a socket address, or None if malformed."""
    try:
        host, port = split_host_port(text)
        return (str(ipaddress.ip_address(host)), port)
    except ValueError:
        return None


def rank_endpoints(endpoints: tuple[str, ...], own_hosts: set[str]) -> list[Endpoint]:
    """Order candidates: an address we share (the same host, e.g. loopback) first, then private
    addresses (likely the same LAN), then the rest; IPv4 before IPv6 within a class."""
    parsed = [ep for ep in (parse_endpoint(e) for e in endpoints) if ep is not None]

    def rank(endpoint: Endpoint) -> tuple[int, int]:
        address = ipaddress.ip_address(endpoint[0])
        if endpoint[0] in own_hosts:
            klass = 0
        elif address.is_private and not address.is_loopback:
            klass = 1
        elif address.is_loopback:
            klass = 2 if own_hosts & {"127.0.0.1", "::1"} else 4
        else:
            klass = 3
        return (klass, address.version)

    return sorted(parsed, key=rank)
