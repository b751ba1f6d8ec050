"""The whole overlay stack of one node: the interface with ICMP, TCP and UDP, as one sans-IO core.

Packets come in through :meth:`Netstack.receive` and leave through the ``transmit`` callable (the
link: the WireGuard device, a TUN device in tests, a simulated link). Timers of every transport
are reached through :meth:`Netstack.next_deadline` and :meth:`Netstack.handle_timeout`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address, IPv6Address

from embedmesh.netstack.interface import NetworkInterface
from embedmesh.netstack.tcp.config import TcpConfig
from embedmesh.netstack.tcp.layer import TcpLayer
from embedmesh.netstack.udp import UdpLayer
from embedmesh.wire.ip import PROTO_TCP, IpPacket, build_ip


class Netstack:
    """Interface + TCP + UDP over one link."""

    def __init__(
        self,
        addresses: Iterable[bytes | str | IPv4Address | IPv6Address],
        transmit: Callable[[bytes], None],
        *,
        mtu: int = 1280,
        rng: random.Random | None = None,
        tcp_config: TcpConfig | None = None,
    ) -> None:
        rng = rng or random.Random()
        self.transmit = transmit
        self.interface = NetworkInterface(addresses, self._transmit, mtu=mtu)
        self.tcp = TcpLayer(self._transmit_tcp, rng=rng, config=tcp_config, mtu=mtu)
        self.udp = UdpLayer(self.interface, rng)
        self.interface.register_protocol(PROTO_TCP, self._receive_tcp)

    def _transmit(self, packet: bytes) -> None:
        self.transmit(packet)

    def _transmit_tcp(self, src: bytes, dst: bytes, segment: bytes) -> None:
        self.transmit(build_ip(src, dst, PROTO_TCP, segment))

    def _receive_tcp(self, packet: IpPacket, raw: bytes | memoryview, now: float) -> None:
        self.tcp.segment_received(packet.src, packet.dst, packet.payload, now)

    def receive(self, packet: bytes | memoryview, now: float) -> None:
        """One IP packet from the link."""
        self.interface.receive(packet, now)

    def next_deadline(self) -> float | None:
        return self.tcp.next_deadline()

    def handle_timeout(self, now: float) -> None:
        self.tcp.handle_timeout(now)
