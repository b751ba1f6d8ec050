"""Shared pieces of the DNS tests: network maps built by hand, queries built with dnspython, a
DNS-config object with the admin fields (extra records, split DNS), and a test upstream resolver
that runs on loopback only."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

import anyio
import anyio.abc
import dns.exception
import dns.flags
import dns.message
import dns.rdatatype
from anyio.streams.buffered import BufferedByteReceiveStream

from embedmesh.control.netmap import DNSConfig, NetworkMap, PeerInfo

IPAddress = IPv4Address | IPv6Address


@dataclass(frozen=True)
class AdminDNSConfig:
    """A DNSConfig with the fields the coordination server is getting (extra records, split DNS)."""

    base_domain: str = "mesh.internal"
    magic_dns: bool = True
    search_domains: tuple[str, ...] = ("mesh.internal",)
    extra_records: tuple[tuple[str, str, str], ...] = ()
    split_dns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def peer(node_id: int, name: str, *addresses: str, base: str = "mesh.internal") -> PeerInfo:
    ips = tuple(ip_address(a) for a in addresses)
    return PeerInfo(
        id=node_id,
        node_key=bytes([node_id]) * 32,
        disco_key=bytes([node_id]) * 32,
        name=name,
        hostname=name,
        fqdn=f"{name}.{base}",
        addresses=ips,
        allowed_ips=tuple(ip_network(a) for a in ips),
    )


def netmap(*peers: PeerInfo, me: PeerInfo | None = None, dns: Any = None) -> NetworkMap:
    me = me or peer(1, "me", "100.64.0.1", "fd7a:115c:a1e0::6440:1")
    config = dns if dns is not None else DNSConfig("mesh.internal", True, ("mesh.internal",))
    return NetworkMap(me, {p.id: p for p in peers}, config)  # type: ignore[arg-type]


def standard_map(dns: Any = None) -> NetworkMap:
    return netmap(
        peer(2, "db", "100.64.0.2", "fd7a:115c:a1e0::6440:2"),
        peer(3, "web", "100.64.0.3"),
        dns=dns,
    )


def renamed(m: NetworkMap, node_id: int, name: str) -> NetworkMap:
    info = m.peers[node_id]
    peers = dict(m.peers)
    peers[node_id] = dataclasses.replace(info, name=name, fqdn=f"{name}.mesh.internal")
    return NetworkMap(m.self_node, peers, m.dns, m.packet_filter)


def without(m: NetworkMap, node_id: int) -> NetworkMap:
    peers = {k: v for k, v in m.peers.items() if k != node_id}
    return NetworkMap(m.self_node, peers, m.dns, m.packet_filter)


def query(name: str, rdtype: str = "A", *, edns: int | None = None, payload: int = 1232, **kw: Any) -> bytes:
    if edns is None and not kw.get("want_dnssec"):
        message = dns.message.make_query(name, rdtype, use_edns=False, **kw)
    else:
        message = dns.message.make_query(name, rdtype, use_edns=edns or 0, payload=payload, **kw)
    return bytes(message.to_wire())


def parse(data: bytes) -> dns.message.Message:
    return dns.message.from_wire(data, ignore_trailing=False)


def answers(message: dns.message.Message) -> list[str]:
    """``["db.mesh.internal. A 100.64.0.2", ...]`` for the answer section, in order."""
    out = []
    for rrset in message.answer:
        for rdata in rrset:
            out.append(f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)} {rdata}")
    return out


# ------------------------------------------------------------------------------------------------
# A test upstream resolver on loopback: a tiny authoritative server whose answers the test decides.

Handler = Callable[[dns.message.Message], dns.message.Message | None]


def zone_handler(
    records: Mapping[tuple[str, str], list[str]], *, ttl: int = 60, soa_minimum: int = 30
) -> Handler:
    """Answers from ``{(name, type): [rdata text, ...]}``; NXDOMAIN with an SOA otherwise."""
    import dns.rrset

    table = {(n.rstrip(".").lower(), t.upper()): v for (n, t), v in records.items()}
    names = {n for n, _ in table}

    def handle(q: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(q)
        question = q.question[0]
        name = question.name.to_text().rstrip(".").lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        values = table.get((name, rdtype))
        if values:
            reply.answer.append(dns.rrset.from_text_list(question.name, ttl, "IN", rdtype, values))
        else:
            if name not in names:
                reply.set_rcode(3)
            soa = dns.rrset.from_text(
                "test.", ttl, "IN", "SOA", f"ns.test. admin.test. 1 3600 600 86400 {soa_minimum}"
            )
            reply.authority.append(soa)
        return reply

    return handle


class TestUpstream:
    """A DNS server on 127.0.0.1 (UDP and TCP on one port), counting what it is asked."""

    __test__ = False

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.queries: list[tuple[str, str, str]] = []  # (transport, name, type)
        self.port = 0
        self.silent = False
        self.truncate_udp = False

    def answer(self, data: bytes, transport: str) -> bytes | None:
        q = dns.message.from_wire(data)
        question = q.question[0]
        self.queries.append((transport, question.name.to_text(), dns.rdatatype.to_text(question.rdtype)))
        if self.silent:
            return None
        reply = self.handler(q)
        if reply is None:
            return None
        if transport == "udp" and self.truncate_udp:
            reply.flags |= dns.flags.TC
            reply.answer.clear()
        limit = (q.payload if q.edns >= 0 else 512) if transport == "udp" else 65535
        try:
            return bytes(reply.to_wire(max_size=limit))
        except dns.exception.TooBig:
            reply.flags |= dns.flags.TC
            reply.answer.clear()
            return bytes(reply.to_wire())

    async def run(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        import errno
        import socket

        # UDP and TCP on one port: the OS picks the UDP port, and another process may already hold
        # that TCP port (the suite runs beside other servers), so pick again until both are free.
        for attempt in range(50):
            udp = await anyio.create_udp_socket(family=socket.AF_INET, local_host="127.0.0.1")
            self.port = int(udp.extra(anyio.abc.SocketAttribute.local_port))
            try:
                listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
                break
            except OSError as exc:
                await udp.aclose()
                if exc.errno != errno.EADDRINUSE or attempt == 49:
                    raise

        async def serve_udp() -> None:
            async for data, (host, port) in udp:
                reply = self.answer(data, "udp")
                if reply is not None:
                    await udp.sendto(reply, host, port)

        async def serve_tcp(stream: anyio.abc.ByteStream) -> None:
            reader = BufferedByteReceiveStream(stream)
            try:
                while True:
                    length = int.from_bytes(await reader.receive_exactly(2), "big")
                    reply = self.answer(await reader.receive_exactly(length), "tcp")
                    if reply is not None:
                        await stream.send(len(reply).to_bytes(2, "big") + reply)
            except (anyio.IncompleteRead, anyio.EndOfStream, anyio.BrokenResourceError):
                pass

        async with udp, listener, anyio.create_task_group() as tg:
            tg.start_soon(serve_udp)
            tg.start_soon(listener.serve, serve_tcp)
            task_status.started(self.port)


def rng() -> random.Random:
    return random.Random(7)
