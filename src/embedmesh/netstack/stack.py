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
from embedmesh.wire.ipv4 import build_ipv4_summed, header_partial_sum


class Netstack:
    """Interface + TCP + UDP over one link.

    ``rng`` is the one random source of TCP and UDP (keys, ephemeral ports): the operating system's
    CSPRNG (:class:`random.SystemRandom`) unless a simulation hands in a seeded ``random.Random``.
    """

    def __init__(
        self,
        addresses: Iterable[bytes | str | IPv4Address | IPv6Address],
        transmit: Callable[[bytes], None],
        *,
        mtu: int = 1280,
        rng: random.Random | None = None,
        tcp_config: TcpConfig | None = None,
    ) -> None:
        rng = rng if rng is not None else random.SystemRandom()
        self.transmit = transmit
        self.interface = NetworkInterface(addresses, self._transmit, mtu=mtu)
        self.tcp = TcpLayer(self._transmit_tcp, rng=rng, config=tcp_config, mtu=mtu)
        self.udp = UdpLayer(self.interface, rng)
        self._ipv4_sums: dict[tuple[bytes, bytes], int] = {}
        self.interface.register_protocol(PROTO_TCP, self._receive_tcp, fast=self.tcp.segment_received)
        #: One IP packet from the link (the interface's own entry: no wrapper on the per-packet path).
        self.receive = self.interface.receive

    def _transmit(self, packet: bytes) -> None:
        self.transmit(packet)

    def _transmit_tcp(self, src: bytes, dst: bytes, segment: bytes) -> None:
        if len(src) == 4:
            # Every segment of a connection has the same IPv4 header but for its length.
            pair = (src, dst)
            partial = self._ipv4_sums.get(pair)
            if partial is None:
                if len(self._ipv4_sums) >= 4096:
                    self._ipv4_sums.clear()
                partial = self._ipv4_sums[pair] = header_partial_sum(src, dst, PROTO_TCP)
            self.transmit(build_ipv4_summed(partial, src, dst, PROTO_TCP, segment))
        else:
            self.transmit(build_ip(src, dst, PROTO_TCP, segment))

    def _receive_tcp(self, packet: IpPacket, raw: bytes | memoryview, now: float) -> None:
        self.tcp.segment_received(packet.src, packet.dst, packet.payload, now)

    def begin_batch(self) -> None:
        """The packets until :meth:`end_batch` arrived together (one read of the link): TCP sends
        one ACK per connection for their in-order data instead of one per two segments."""
        self.tcp.begin_batch()

    def end_batch(self, now: float) -> None:
        """Send the ACKs the batch deferred (see :meth:`TcpLayer.begin_batch`)."""
        self.tcp.end_batch(now)

    def next_deadline(self) -> float | None:
        return self.tcp.next_deadline()

    def handle_timeout(self, now: float) -> None:
        self.tcp.handle_timeout(now)
