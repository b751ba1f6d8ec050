"""Static mode (wg-quick configurations, no coordination server): one embedmesh node asks another's
MagicDNS at 100.100.100.100 over WireGuard as a plain WireGuard client would, and a split-DNS route
to a resolver inside the mesh is reached over the overlay, not the host network."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import anyio
import anyio.abc
import dns.message
import dns.rcode
from anyio.streams.buffered import BufferedByteReceiveStream
from tests.dns.dns_harness import AdminDNSConfig, TestUpstream, answers, netmap, peer, zone_handler
from tests.test_node_static import _configs

from embedmesh import Node
from embedmesh.dns.records import MagicZone


def test_static_peer_uses_magicdns_and_split_dns_inside_the_mesh() -> None:
    corp = TestUpstream(zone_handler({("intranet.corp.example", "A"): ["100.64.0.2"]}))
    big = zone_handler({("big.corp.example", "TXT"): [f'"{i:03d}{"x" * 200}"' for i in range(10)]})

    async def serve_corp_dns(node: Node, task_status: anyio.abc.TaskStatus[None]) -> None:
        """A resolver on node b's overlay address, port 5300, UDP and TCP."""
        udp = await node.listen_packet("udp", "100.64.0.2:5300")
        tcp = await node.listen("tcp", "100.64.0.2:5300")

        async def udp_loop() -> None:
            while True:
                data, (host, port) = await udp.receive()
                reply = corp.answer(data, "udp")
                if reply is not None:
                    await udp.sendto(reply, host, port)

        async def tcp_conn(stream: Any) -> None:
            reader = BufferedByteReceiveStream(stream)
            length = int.from_bytes(await reader.receive_exactly(2), "big")
            reply = corp.answer(await reader.receive_exactly(length), "tcp")
            assert reply is not None
            await stream.send(len(reply).to_bytes(2, "big") + reply)

        async with anyio.create_task_group() as tg:
            tg.start_soon(udp_loop)
            tg.start_soon(tcp.serve, tcp_conn)
            task_status.started()

    async def main() -> None:
        a_text, b_text = _configs()
        async with Node(wireguard_config=b_text, listen_host="127.0.0.1", dns_upstreams=[]) as b:
            await b.up()
            # A knows B as the peer for 100.100.100.100, like `DNS = 100.100.100.100` in wg-quick.
            a_text = a_text.replace("{port_b}", str(b.listen_port)).replace(
                "AllowedIPs = 100.64.0.2/32", "AllowedIPs = 100.64.0.2/32, 100.100.100.100/32"
            )
            names = netmap(
                peer(2, "b", "100.64.0.2", "fd7a:115c:a1e0::2"),
                me=peer(1, "a", "100.64.0.1", "fd7a:115c:a1e0::1"),
                dns=AdminDNSConfig(
                    search_domains=("mesh.internal", "corp.example"),
                    split_dns={"corp.example": ("100.64.0.2:5300",)},
                ),
            )
            async with (
                Node(wireguard_config=a_text, listen_host="127.0.0.1", dns_upstreams=[]) as a,
                anyio.create_task_group() as tg,
            ):
                await a.up()
                b.dns.set_zone(MagicZone.from_netmap(names))
                a.dns.set_zone(MagicZone.from_netmap(names))
                await tg.start(serve_corp_dns, b)

                # A asks B's MagicDNS over WireGuard, UDP then TCP.
                sock = await a.listen_packet("udp", ":0")
                await sock.sendto(
                    dns.message.make_query("a.mesh.internal", "A").to_wire(), "100.100.100.100", 53
                )
                with anyio.fail_after(5):
                    data, source = await sock.receive()
                assert source == ("100.100.100.100", 53)
                assert answers(dns.message.from_wire(data)) == ["a.mesh.internal. A 100.64.0.1"]
                stream = await a.dial("tcp", "100.100.100.100:53", timeout=5)
                wire = dns.message.make_query("b", "AAAA").to_wire()
                await stream.send(len(wire).to_bytes(2, "big") + wire)
                reader = BufferedByteReceiveStream(stream)
                length = int.from_bytes(await reader.receive_exactly(2), "big")
                assert answers(dns.message.from_wire(await reader.receive_exactly(length))) == [
                    "b. AAAA fd7a:115c:a1e0::2"
                ]
                await stream.aclose()

                # A's own resolver: the split-DNS resolver lives on B's overlay address.
                assert await a.resolve("intranet.corp.example") == [ip_address("100.64.0.2")]
                assert await a.resolve("intranet") == [ip_address("100.64.0.2")]  # via the search domain
                assert ("udp", "intranet.corp.example.", "A") in corp.queries
                # A large answer: truncated over the mesh's UDP, fetched again over mesh TCP.
                corp.handler = big
                query = dns.message.make_query("big.corp.example", "TXT").to_wire()
                reply = dns.message.from_wire(await a.dns.query(query))
                assert reply.rcode() == dns.rcode.NOERROR and len(reply.answer[0]) == 10
                assert ("tcp", "big.corp.example.", "TXT") in corp.queries
                tg.cancel_scope.cancel()

    anyio.run(main)
