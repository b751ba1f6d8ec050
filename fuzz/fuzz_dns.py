"""Fuzz target: the MagicDNS query path, from the bytes of one datagram to the bytes of the answer.

Each input is parsed as a query (only ParseError may escape the parser), then handed to a resolver
with a small tailnet zone, extra records and a split-DNS route, as a UDP client allowed to forward
and as one that is not. Invariants: the resolver never raises; an answer is a response (QR set)
with the query's ID, parses back with our own scanner and with dnspython, and over UDP never exceeds
the size the query allows. The same bytes are also fed back as an upstream's answer to a pending
lookup, which must never raise either, and scanned as a whole message.
"""

from __future__ import annotations

import random
import sys
from ipaddress import ip_address, ip_network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import dns.message

from embedmesh.control.netmap import NetworkMap, PeerInfo
from embedmesh.dns.message import (
    CLASSIC_UDP_SIZE,
    EDNS_UDP_SIZE,
    FLAG_QR,
    parse_header,
    parse_message,
    parse_query,
)
from embedmesh.dns.records import MagicZone
from embedmesh.dns.resolver import PENDING, Client, Recursion, Resolver
from embedmesh.dns.upstream import HostDnsConfig, Upstream
from embedmesh.errors import ParseError


class _Dns:
    base_domain = "mesh.internal"
    magic_dns = True
    search_domains = ("mesh.internal",)
    extra_records = (
        ("grafana", "A", "100.64.0.9"),
        ("alias", "CNAME", "db.mesh.internal"),
        ("txt", "TXT", "x" * 300),
    )
    split_dns = {"lab.example": ("127.0.0.1:5300",), "hidden.test": ()}


def _peer(node_id: int, name: str, *addresses: str) -> PeerInfo:
    ips = tuple(ip_address(a) for a in addresses)
    return PeerInfo(
        id=node_id,
        node_key=bytes([node_id]) * 32,
        disco_key=bytes([node_id]) * 32,
        name=name,
        hostname=name,
        fqdn=f"{name}.mesh.internal",
        addresses=ips,
        allowed_ips=tuple(ip_network(a) for a in ips),
    )


_MAP = NetworkMap(
    _peer(1, "me", "100.64.0.1", "fd7a:115c:a1e0::6440:1"),
    {2: _peer(2, "db", "100.64.0.2", "fd7a:115c:a1e0::6440:2"), 3: _peer(3, "web", "100.64.0.3")},
    _Dns(),  # type: ignore[arg-type]
)
_ZONE = MagicZone.from_netmap(_MAP)
_CLIENTS = (
    Client(1, "udp", Recursion.ALL),
    Client(2, "udp", Recursion.NONE),
    Client(4, "udp", Recursion.ROUTES),
    Client(3, "tcp", Recursion.ALL),
)


def _check_answer(query: bytes, answer: bytes, client: Client) -> None:
    header = parse_header(answer)
    assert header.flags & FLAG_QR
    assert header.id == parse_header(query).id
    parse_message(answer)  # our scanner accepts everything we send
    dns.message.from_wire(answer)  # and so does an independent parser (dnspython)
    if client.transport == "udp":
        try:
            limit = parse_query(query).max_udp_size()
        except ParseError:
            limit = CLASSIC_UDP_SIZE
        assert len(answer) <= max(limit, CLASSIC_UDP_SIZE) <= EDNS_UDP_SIZE


def TestOneInput(data: bytes) -> None:
    try:
        parse_query(data)
    except ParseError:
        pass
    try:
        parse_message(data)
    except ParseError:
        pass
    resolver = Resolver(rng=random.Random(0), host_config=HostDnsConfig((Upstream("127.0.0.1", 53),)))
    resolver.set_zone(_ZONE)
    for client in _CLIENTS:
        answer = resolver.receive_query(data, client, 0.0)
        if isinstance(answer, bytes):
            _check_answer(data, answer, client)
        else:
            assert answer is None or answer is PENDING
    # The same bytes as an upstream's answer to whatever is pending, then a timeout.
    for exchange in resolver.pop_exchanges():
        resolver.receive_upstream(exchange.id, data, 0.5)
        patched = bytearray(data)
        if len(patched) >= 2:
            patched[0:2] = exchange.data[0:2]  # the right ID, so it gets past the first check
            resolver.receive_upstream(exchange.id, bytes(patched), 0.5)
    resolver.handle_timeout(100.0)
    for client, answer in resolver.pop_replies():
        _check_answer(data, answer, client)


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
