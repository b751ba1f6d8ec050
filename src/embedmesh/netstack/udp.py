"""UDP over the overlay interface: port demultiplexing, bounded receive queues, and ICMP port
unreachable for closed ports (RFC 1122 §4.1.3.1), rate-limited like Linux's ``icmp_ratelimit``.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable

from embedmesh.errors import ParseError
from embedmesh.netstack.interface import NetworkInterface
from embedmesh.wire import icmp
from embedmesh.wire.ip import PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP, IpPacket, build_ip
from embedmesh.wire.udp import build_udp, parse_udp

#: IANA's dynamic port range (RFC 6335), used for ephemeral ports.
EPHEMERAL_PORTS = range(49152, 65536)
#: Datagrams queued per socket before new ones are dropped (like a full SO_RCVBUF).
DEFAULT_QUEUE_LIMIT = 1024
#: ICMP errors per second, with a burst (Linux: one per ms token, burst 50).
ICMP_ERRORS_PER_SECOND = 1000.0
ICMP_ERROR_BURST = 50.0

Datagram = tuple[bytes, tuple[bytes, int]]


class UdpSocketState:
    """One bound UDP port: the sans-IO half of a UDP socket."""

    __slots__ = ("closed", "layer", "local_address", "local_port", "on_readable", "queue", "queue_limit")

    def __init__(
        self, layer: UdpLayer, local_address: bytes | None, local_port: int, queue_limit: int
    ) -> None:
        self.layer = layer
        self.local_address = local_address
        self.local_port = local_port
        self.queue: deque[Datagram] = deque()
        self.queue_limit = queue_limit
        self.closed = False
        #: Called once each time the queue goes from empty to non-empty.
        self.on_readable: Callable[[], None] | None = None

    def receive(self) -> Datagram | None:
        """The oldest queued datagram as (payload, (source address, source port)), or None."""
        return self.queue.popleft() if self.queue else None

    def send(self, payload: bytes, destination: bytes, port: int) -> None:
        """Send ``payload`` to ``destination`` (raw address bytes) and ``port``."""
        self.layer.send(self, payload, destination, port)

    def close(self) -> None:
        self.layer.unbind(self)


class UdpLayer:
    """All UDP sockets of one interface. ``rng`` picks ephemeral ports (RFC 6056: unpredictable, so
    an off-path attacker cannot aim spoofed datagrams at a port): :class:`random.SystemRandom` unless
    a simulation hands in a seeded one."""

    def __init__(self, interface: NetworkInterface, rng: random.Random | None = None) -> None:
        self.interface = interface
        self.rng = rng if rng is not None else random.SystemRandom()
        self.counters: Counter[str] = Counter()
        # (local address or None for any, port) -> socket
        self._sockets: dict[tuple[bytes | None, int], UdpSocketState] = {}
        self._icmp_tokens = ICMP_ERROR_BURST
        self._icmp_last = 0.0
        interface.register_protocol(PROTO_UDP, self.receive)

    # ------------------------------------------------------------------ sockets

    def bind(
        self, local_address: bytes | None, port: int, *, queue_limit: int = DEFAULT_QUEUE_LIMIT
    ) -> UdpSocketState:
        """Bind ``port`` (0 picks an ephemeral one) on one address or, with None, on all."""
        if local_address is not None and not self.interface.is_local(local_address):
            raise OSError(99, "Cannot assign requested address: not an address of this node")
        if port == 0:
            port = self._ephemeral_port(local_address)
        if (
            (local_address, port) in self._sockets
            or (None, port) in self._sockets
            or (local_address is None and any(p == port for (_, p) in self._sockets))
        ):
            raise OSError(98, f"Address already in use: UDP port {port}")
        sock = UdpSocketState(self, local_address, port, queue_limit)
        self._sockets[(local_address, port)] = sock
        return sock

    def unbind(self, sock: UdpSocketState) -> None:
        sock.closed = True
        if self._sockets.get((sock.local_address, sock.local_port)) is sock:
            del self._sockets[(sock.local_address, sock.local_port)]

    def _ephemeral_port(self, local_address: bytes | None) -> int:
        used = {p for (_, p) in self._sockets}
        for _ in range(64):
            port = self.rng.choice(EPHEMERAL_PORTS)
            if port not in used:
                return port
        for port in EPHEMERAL_PORTS:
            if port not in used:
                return port
        raise OSError(98, "no free ephemeral UDP port")

    # ------------------------------------------------------------------ input

    def receive(self, packet: IpPacket, raw: bytes | memoryview, now: float) -> None:
        try:
            datagram = parse_udp(packet.payload, packet.src, packet.dst)
        except ParseError:
            self.counters["drop_malformed"] += 1
            return
        port = datagram.dst_port
        sock = self._sockets.get((packet.dst, port)) or self._sockets.get((None, port))
        if sock is None:
            self.counters["rx_closed_port"] += 1
            self._port_unreachable(packet, raw, now)
            return
        queue = sock.queue
        if len(queue) >= sock.queue_limit:
            self.counters["drop_queue_full"] += 1
            return
        queue.append((bytes(datagram.payload), (packet.src, datagram.src_port)))
        self.counters["rx_datagrams"] += 1
        if len(queue) == 1 and sock.on_readable is not None:
            sock.on_readable()

    def _port_unreachable(self, packet: IpPacket, raw: bytes | memoryview, now: float) -> None:
        self._icmp_tokens = min(
            ICMP_ERROR_BURST, self._icmp_tokens + (now - self._icmp_last) * ICMP_ERRORS_PER_SECOND
        )
        self._icmp_last = now
        if self._icmp_tokens < 1.0:
            self.counters["icmp_error_rate_limited"] += 1
            return
        self._icmp_tokens -= 1.0
        if packet.version == 4:
            message = icmp.build_icmpv4_unreachable(icmp.ICMPV4_PORT_UNREACHABLE, raw)
            reply = build_ip(packet.dst, packet.src, PROTO_ICMP, message)
        else:
            message = icmp.build_icmpv6_unreachable(packet.dst, packet.src, icmp.ICMPV6_PORT_UNREACHABLE, raw)
            reply = build_ip(packet.dst, packet.src, PROTO_ICMPV6, message)
        self.counters["tx_port_unreachable"] += 1
        self.interface.transmit(reply)

    # ------------------------------------------------------------------ output

    def send(self, sock: UdpSocketState, payload: bytes, destination: bytes, port: int) -> None:
        if sock.closed:
            raise OSError(9, "Bad file descriptor: the UDP socket is closed")
        if not 0 < port < 65536:
            raise ValueError(f"invalid UDP port {port}")
        source = sock.local_address or self.interface.source_for(destination)
        if len(source) != len(destination):
            raise OSError(97, "Address family not supported: the socket is bound to the other IP version")
        if len(payload) > 65535 - 8 - (20 if len(source) == 4 else 40):
            raise OSError(90, "Message too long for one UDP datagram")
        segment = build_udp(source, destination, sock.local_port, port, payload)
        self.counters["tx_datagrams"] += 1
        self.interface.transmit(build_ip(source, destination, PROTO_UDP, segment))
