"""MagicDNS is not a window into the node's host network (issue 8): a peer asking at
100.100.100.100 over WireGuard gets the tailnet's names and its split-DNS routes, and REFUSED for
everything else, unless the node opts in with ``dns_forward_for_peers=True``; the node's own
``resolve()`` and loopback clients of its ``--dns`` port still forward. And no answer to ANY is more
than 2.4 times the size of its question (RFC 8482 minimal answers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ipaddress import ip_address

import anyio
import anyio.abc
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from tests.dns.dns_harness import AdminDNSConfig, Handler, TestUpstream, answers, netmap, peer, zone_handler
from tests.test_node_static import _configs

from embedmesh import Node
from embedmesh.dns.records import MagicZone

HOST_ONLY = "internal-only.corp.example"
BIG_TXT = [f'"{i:03d}{"x" * 200}"' for i in range(4)]


@dataclass
class Mesh:
    a: Node  # the peer, a plain WireGuard client of b's MagicDNS
    b: Node  # the node serving MagicDNS at 100.100.100.100
    host_dns: TestUpstream  # b's upstream resolver (what resolv.conf would name)
    lab_dns: TestUpstream  # the resolver of the split-DNS route lab.example


def with_big_any(records: dict[tuple[str, str], list[str]]) -> Handler:
    """An upstream that answers ANY as a real server does: with every RRset it has (here a big
    TXT one), the answer an amplification attack wants relayed."""
    plain = zone_handler(records)

    def handle(q: dns.message.Message) -> dns.message.Message | None:
        if q.question[0].rdtype != dns.rdatatype.ANY:
            return plain(q)
        reply = dns.message.make_response(q)
        reply.answer.append(dns.rrset.from_text_list(q.question[0].name, 60, "IN", "TXT", BIG_TXT))
        return reply

    return handle


@asynccontextmanager
async def mesh(*, dns_forward_for_peers: bool = False) -> AsyncIterator[Mesh]:
    host_dns = TestUpstream(with_big_any({(HOST_ONLY, "A"): ["10.20.30.40"], (HOST_ONLY, "TXT"): BIG_TXT}))
    lab_dns = TestUpstream(with_big_any({("nas.lab.example", "A"): ["10.9.0.7"]}))
    async with anyio.create_task_group() as tg:
        host_port = await tg.start(host_dns.run)
        lab_port = await tg.start(lab_dns.run)
        a_text, b_text = _configs()
        async with Node(
            wireguard_config=b_text,
            listen_host="127.0.0.1",
            dns_upstreams=[f"127.0.0.1:{host_port}"],
            dns_forward_for_peers=dns_forward_for_peers,
        ) as b:
            # A knows B as the peer for 100.100.100.100, like `DNS = 100.100.100.100` in wg-quick.
            a_text = a_text.replace("{port_b}", str(b.listen_port)).replace(
                "AllowedIPs = 100.64.0.2/32", "AllowedIPs = 100.64.0.2/32, 100.100.100.100/32"
            )
            names = netmap(
                peer(2, "b", "100.64.0.2", "fd7a:115c:a1e0::2"),
                peer(3, "v6only", "fd7a:115c:a1e0::3"),
                me=peer(1, "a", "100.64.0.1", "fd7a:115c:a1e0::1"),
                dns=AdminDNSConfig(
                    split_dns={"lab.example": (f"127.0.0.1:{lab_port}",)},
                    extra_records=(
                        ("notes", "TXT", "x" * 600),
                        ("many", "A", "100.64.0.50"),
                        ("many", "A", "100.64.0.51"),
                        ("many", "A", "100.64.0.52"),
                        ("x", "CNAME", "b.mesh.internal"),
                    ),
                ),
            )
            b.dns.set_zone(MagicZone.from_netmap(names))
            async with Node(wireguard_config=a_text, listen_host="127.0.0.1", dns_upstreams=[]) as a:
                yield Mesh(a, b, host_dns, lab_dns)
        tg.cancel_scope.cancel()


async def ask_overlay(node: Node, wire: bytes, *, tcp: bool = False) -> bytes:
    """Send ``wire`` to 100.100.100.100:53 from ``node`` over WireGuard; the answer's bytes."""
    with anyio.fail_after(10):
        if tcp:
            stream = await node.dial("tcp", "100.100.100.100:53", timeout=5)
            async with stream:
                await stream.send(len(wire).to_bytes(2, "big") + wire)
                data = b""
                while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
                    data += await stream.receive()
                return data[2:]
        sock = await node.listen_packet("udp", ":0")
        async with sock:
            await sock.sendto(wire, "100.100.100.100", 53)
            data, _ = await sock.receive()
            return data


def make(name: str, rdtype: str = "A", *, edns: bool = False) -> bytes:
    return bytes(dns.message.make_query(name, rdtype, use_edns=0 if edns else False).to_wire())


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_a_peer_cannot_use_the_nodes_host_resolvers(tcp: bool) -> None:
    async def main() -> None:
        async with mesh() as m:
            refused = dns.message.from_wire(await ask_overlay(m.a, make(HOST_ONLY), tcp=tcp))
            assert refused.rcode() == dns.rcode.REFUSED and not refused.answer
            assert m.host_dns.queries == []  # the question never left the node
            # Tailnet names and the admin's split-DNS routes are still answered for peers.
            local = dns.message.from_wire(await ask_overlay(m.a, make("b.mesh.internal"), tcp=tcp))
            assert answers(local) == ["b.mesh.internal. A 100.64.0.2"]
            routed = dns.message.from_wire(await ask_overlay(m.a, make("nas.lab.example"), tcp=tcp))
            assert answers(routed) == ["nas.lab.example. A 10.9.0.7"]
            assert m.lab_dns.queries == [("udp", "nas.lab.example.", "A")]
            assert m.host_dns.queries == []
            # The node itself still forwards: resolve() and a loopback client of its local port.
            assert await m.b.resolve(HOST_ONLY) == [ip_address("10.20.30.40")]
            host, port = await m.b.serve_dns("127.0.0.1:0")
            sock = await anyio.create_udp_socket(local_host="127.0.0.1")
            async with sock:
                await sock.sendto(make(HOST_ONLY, "TXT", edns=True), host, port)
                with anyio.fail_after(5):
                    data, _ = await sock.receive()
            assert len(dns.message.from_wire(data).answer[0]) == len(BIG_TXT)
            assert {q[1:] for q in m.host_dns.queries} >= {(f"{HOST_ONLY}.", "A"), (f"{HOST_ONLY}.", "TXT")}

    anyio.run(main)


def test_a_node_that_opts_in_forwards_for_its_peers() -> None:
    async def main() -> None:
        async with mesh(dns_forward_for_peers=True) as m:
            reply = dns.message.from_wire(await ask_overlay(m.a, make(HOST_ONLY)))
            assert answers(reply) == [f"{HOST_ONLY}. A 10.20.30.40"]
            assert m.host_dns.queries == [("udp", f"{HOST_ONLY}.", "A")]

    anyio.run(main)


ANY_NAMES = [
    "b",  # a node by short name: A and AAAA
    "b.mesh.internal",
    "a",  # the peer itself
    "v6only",  # a node with IPv6 only
    "notes",  # an extra TXT record of 600 bytes
    "many.mesh.internal",  # three extra A records
    "x",  # an extra CNAME
    "mesh.internal",  # the apex (SOA)
    "q.mesh.internal",  # NXDOMAIN in the zone (with an SOA for other types)
    "2.0.64.100.in-addr.arpa",  # a reverse name
    "9.9.64.100.in-addr.arpa",  # a reverse name in the tailnet range that no node has
    "nas.lab.example",  # a split-DNS route, whose resolver has a big answer to ANY
    HOST_ONLY,  # refused for peers; for the opted-in node, the host resolver's big answer
    "z",  # a one-letter name that is nowhere
]


@pytest.mark.parametrize("forward", [False, True], ids=["default", "dns_forward_for_peers"])
def test_any_amplifies_at_most_2_4_times(forward: bool) -> None:
    """Response bytes over query bytes for ANY, over UDP from a peer on the overlay and from a
    loopback client of the local port, with and without EDNS."""

    async def main() -> None:
        async with mesh(dns_forward_for_peers=forward) as m:
            host, port = await m.b.serve_dns("127.0.0.1:0")
            local = await anyio.create_udp_socket(local_host="127.0.0.1")
            ratios: dict[str, float] = {}
            async with local:
                for name in ANY_NAMES:
                    for edns in (False, True):
                        wire = make(name, "ANY", edns=edns)
                        overlay = await ask_overlay(m.a, wire)
                        await local.sendto(wire, host, port)
                        with anyio.fail_after(5):
                            loopback, _ = await local.receive()
                        for where, reply in (("overlay", overlay), ("loopback", loopback)):
                            message = dns.message.from_wire(reply)
                            assert message.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.REFUSED)
                            ratios[f"{where} {name} edns={edns}"] = len(reply) / len(wire)
            worst = max(ratios, key=ratios.__getitem__)
            assert ratios[worst] <= 2.4, (worst, ratios[worst])
            # ANY over UDP is answered without asking any upstream (RFC 8482).
            assert not [q for q in (*m.host_dns.queries, *m.lab_dns.queries) if q[2] == "ANY"]

    anyio.run(main)


def test_any_over_tcp_still_gets_the_names_records() -> None:
    """Amplification needs UDP; over TCP a tailnet name's ANY answers its smallest RRset too, and
    a routed name's ANY is forwarded."""

    async def main() -> None:
        async with mesh() as m:
            reply = dns.message.from_wire(await ask_overlay(m.a, make("b", "ANY"), tcp=True))
            assert answers(reply) == ["b. A 100.64.0.2"]
            hinfo = dns.message.from_wire(await ask_overlay(m.a, make("notes", "ANY"), tcp=True))
            assert answers(hinfo) == ['notes. HINFO "RFC8482" ""']
            routed = dns.message.from_wire(await ask_overlay(m.a, make("nas.lab.example", "ANY"), tcp=True))
            assert ("udp", "nas.lab.example.", "ANY") in m.lab_dns.queries
            assert len(routed.answer[0]) == len(BIG_TXT)

    anyio.run(main)
