"""Two simulated nodes joined by a simulated underlay, for WireGuard tests on virtual time."""

from __future__ import annotations

import random
from dataclasses import dataclass

from embedmesh.sim.network import LinkConditions, SimNetwork
from embedmesh.sim.node import SimNode, connect
from embedmesh.wire.icmp import ICMPV4_ECHO_REQUEST, build_icmpv4_echo
from embedmesh.wire.ip import PROTO_ICMP, build_ip

A_IP = "100.64.0.1"
B_IP = "100.64.0.2"
A_EP = ("198.18.0.1", 51820)
B_EP = ("198.18.0.2", 51820)


@dataclass
class Pair:
    net: SimNetwork
    a: SimNode
    b: SimNode

    def ping_packet(self, src: SimNode, dst_ip: str, seq: int) -> bytes:
        src_ip = bytes(src.interface.addresses[0])
        echo = build_icmpv4_echo(ICMPV4_ECHO_REQUEST, 7, seq, b"x" * 32)
        return build_ip(src_ip, bytes(map(int, dst_ip.split("."))), PROTO_ICMP, echo)

    def ping(self, src: SimNode, seq: int) -> None:
        dst_ip = B_IP if src is self.a else A_IP
        src.send_packet(self.ping_packet(src, dst_ip, seq), self.net.now)
        self.net.flush()

    def replies(self, node: SimNode) -> set[int]:
        return {r.sequence for r in node.echo_replies}


def make_pair(seed: int = 1, conditions: LinkConditions | None = None, **connect_options: object) -> Pair:
    rng = random.Random(seed)
    net = SimNetwork(rng, conditions)
    a = SimNode(rng, [A_IP], endpoint=A_EP)
    b = SimNode(rng, [B_IP], endpoint=B_EP)
    connect(a, b, a_allowed=[f"{B_IP}/32"], b_allowed=[f"{A_IP}/32"], **connect_options)  # type: ignore[arg-type]
    net.attach(A_EP, a)
    net.attach(B_EP, b)
    return Pair(net, a, b)
