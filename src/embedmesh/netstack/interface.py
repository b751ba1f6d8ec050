"""The overlay interface: the node's own IP addresses and the dispatch of packets to protocols.

Packets arrive from a link (the WireGuard device, a simulated link, a TUN device in tests) through
:meth:`NetworkInterface.receive`, and leave through the ``transmit`` callable the owner provides.
ICMP and ICMPv6 echo are answered here; transports (TCP, UDP) plug in with
:meth:`NetworkInterface.register_protocol`. Like every core, it never touches a socket or a clock.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from embedmesh.errors import ParseError
from embedmesh.wire import icmp
from embedmesh.wire.checksum import ones_sum
from embedmesh.wire.ip import PROTO_ICMP, PROTO_ICMPV6, IpPacket, build_ip, parse_ip

logger = logging.getLogger("embedmesh.netstack")

Buffer = bytes | bytearray | memoryview
ProtocolHandler = Callable[[IpPacket, bytes | memoryview, float], None]
#: ``handler(src, dst, payload, now, payload_sum)``: a transport's entry for the IPv4 packets the fast
#: path took. ``payload_sum`` is congruent, modulo 0xFFFF, to the one's-complement sum of the payload
#: (zero-padded): the transport adds its pseudo-header to verify its checksum without reading the
#: payload again, as a NIC's CHECKSUM_COMPLETE lets Linux do.
FastHandler = Callable[[bytes, bytes, memoryview, float, int], None]

# Version/IHL, Total Length, Flags/Fragment Offset, Protocol (RFC 791 §3.1).
_unpack_v4_prefix = struct.Struct("!BxHxxHxB").unpack_from
_from_bytes = int.from_bytes


@dataclass(slots=True)
class EchoReply:
    """An ICMP(v6) echo reply addressed to us."""

    source: bytes
    ident: int
    sequence: int
    payload: bytes
    received_at: float


class NetworkInterface:
    """One overlay interface with any number of IPv4 and IPv6 addresses."""

    def __init__(
        self,
        addresses: Iterable[bytes | str | IPv4Address | IPv6Address],
        transmit: Callable[[bytes], None],
        *,
        mtu: int = 1420,
    ) -> None:
        self.addresses: list[bytes] = [a if isinstance(a, bytes) else ip_address(a).packed for a in addresses]
        #: Addresses of services the node hosts (MagicDNS at 100.100.100.100): packets to them are
        #: ours, sockets may bind them, but they are never a source chosen for other traffic.
        self.service_addresses: list[bytes] = []
        self._address_set = set(self.addresses)
        self.transmit = transmit
        self.mtu = mtu
        self._counts: Counter[str] = Counter()
        self._rx_packets = 0  # per packet: a plain int, reported by :attr:`counters`
        self._handlers: dict[int, ProtocolHandler] = {}
        self._fast_handlers: dict[int, FastHandler] = {}
        #: Called with each echo reply addressed to us; the runtime matches it to a waiting ping.
        self.on_echo_reply: Callable[[EchoReply], None] | None = None

    @property
    def counters(self) -> Counter[str]:
        """Packets received and dropped by reason: a snapshot."""
        counts = Counter(self._counts)
        if self._rx_packets:
            counts["rx_packets"] = self._rx_packets
        return counts

    # ------------------------------------------------------------------ addresses

    def set_addresses(self, addresses: Iterable[bytes | str | IPv4Address | IPv6Address]) -> None:
        """Replace the interface's addresses (a coordination server assigns them after start)."""
        self.addresses = [a if isinstance(a, bytes) else ip_address(a).packed for a in addresses]
        self._address_set = set(self.addresses) | set(self.service_addresses)

    def add_service_address(self, address: bytes | str | IPv4Address | IPv6Address) -> None:
        """Accept packets for ``address`` too, across :meth:`set_addresses`, without ever sending
        from it unless a socket is bound to it."""
        packed = address if isinstance(address, bytes) else ip_address(address).packed
        if packed not in self.service_addresses:
            self.service_addresses.append(packed)
        self._address_set.add(packed)

    def is_local(self, address: bytes) -> bool:
        return address in self._address_set

    def source_for(self, destination: bytes) -> bytes:
        """Our address to send from towards ``destination``: the first of the same family."""
        for address in self.addresses:
            if len(address) == len(destination):
                return address
        family = "IPv4" if len(destination) == 4 else "IPv6"
        raise ValueError(f"this node has no {family} address to send from")

    def register_protocol(
        self, protocol: int, handler: ProtocolHandler, *, fast: FastHandler | None = None
    ) -> None:
        """Hand every packet of ``protocol`` addressed to us to ``handler(packet, raw, now)``.

        With ``fast``, the common IPv4 packets of ``protocol`` (no options, not a fragment, in a
        ``bytes`` buffer) skip the general parse and go to ``fast(src, dst, payload, now,
        payload_sum)`` instead (see :data:`FastHandler`).
        """
        self._handlers[protocol] = handler
        if fast is not None:
            self._fast_handlers[protocol] = fast
        else:
            self._fast_handlers.pop(protocol, None)

    # ------------------------------------------------------------------ input

    def receive(self, raw: Buffer, now: float) -> None:
        """Process one IP packet from the link. Never raises for anything the packet contains."""
        size = len(raw)
        if size >= 20 and raw.__class__ is bytes:
            # The fast path: IPv4 without options and not a fragment, for a transport that takes
            # it (TCP); the same checks as parse_ipv4 + parse_ip, without building their objects.
            version_ihl, total, fragment, protocol = _unpack_v4_prefix(raw)
            fast = self._fast_handlers.get(protocol)
            if fast is not None and version_ihl == 0x45 and 20 <= total <= size and not fragment & 0x3FFF:
                assert isinstance(raw, bytes)
                dst = raw[16:20]
                # RFC 791 §3.1: the one's-complement sum over the header, checksum included, is all
                # ones, that is a (nonzero) multiple of 0xFFFF.
                if _from_bytes(raw[:20], "big") % 0xFFFF:
                    self._counts["drop_malformed"] += 1
                    return
                if dst not in self._address_set:
                    self._counts["drop_not_local"] += 1
                    return
                self._rx_packets += 1
                # The header sums to 0 (mod 0xFFFF) and is 10 whole words, so the sum over the
                # packet is the payload's sum: one pass over the bytes object, no slice copied.
                whole = raw if total == size else raw[:total]
                fast(raw[12:16], dst, memoryview(raw)[20:total], now, ones_sum(whole))
                return
        try:
            packet = parse_ip(raw)
        except ParseError:
            self._counts["drop_malformed"] += 1
            return
        if packet.dst not in self._address_set:
            self._counts["drop_not_local"] += 1
            return
        self._rx_packets += 1
        protocol = packet.protocol
        handler = self._handlers.get(protocol)
        if handler is not None:
            handler(packet, raw if isinstance(raw, bytes | memoryview) else bytes(raw), now)
        elif protocol == PROTO_ICMP and packet.version == 4:
            self._receive_icmpv4(packet, now)
        elif protocol == PROTO_ICMPV6 and packet.version == 6:
            self._receive_icmpv6(packet, now)
        else:
            self._counts["drop_unknown_protocol"] += 1

    def _receive_icmpv4(self, packet: IpPacket, now: float) -> None:
        try:
            message = icmp.parse_icmpv4(packet.payload)
        except ParseError:
            self._counts["drop_malformed_icmp"] += 1
            return
        if message.type == icmp.ICMPV4_ECHO_REQUEST:
            reply = icmp.build_icmpv4_echo(
                icmp.ICMPV4_ECHO_REPLY, message.ident, message.sequence, message.payload
            )
            self._counts["tx_echo_reply"] += 1
            self.transmit(build_ip(packet.dst, packet.src, PROTO_ICMP, reply))
        elif message.type == icmp.ICMPV4_ECHO_REPLY:
            self._deliver_echo_reply(packet.src, message, now)
        else:
            self._counts["rx_icmp_other"] += 1

    def _receive_icmpv6(self, packet: IpPacket, now: float) -> None:
        try:
            message = icmp.parse_icmpv6(packet.payload, packet.src, packet.dst)
        except ParseError:
            self._counts["drop_malformed_icmp"] += 1
            return
        if message.type == icmp.ICMPV6_ECHO_REQUEST:
            reply = icmp.build_icmpv6_echo(
                packet.dst,
                packet.src,
                icmp.ICMPV6_ECHO_REPLY,
                message.ident,
                message.sequence,
                message.payload,
            )
            self._counts["tx_echo_reply"] += 1
            self.transmit(build_ip(packet.dst, packet.src, PROTO_ICMPV6, reply))
        elif message.type == icmp.ICMPV6_ECHO_REPLY:
            self._deliver_echo_reply(packet.src, message, now)
        else:
            self._counts["rx_icmp_other"] += 1

    def _deliver_echo_reply(self, source: bytes, message: icmp.IcmpMessage, now: float) -> None:
        self._counts["rx_echo_reply"] += 1
        if self.on_echo_reply is not None:
            self.on_echo_reply(
                EchoReply(source, message.ident, message.sequence, bytes(message.payload), now)
            )

    # ------------------------------------------------------------------ output

    def send_echo_request(self, destination: bytes, ident: int, sequence: int, payload: bytes) -> None:
        """Send an ICMP (IPv4) or ICMPv6 (IPv6) echo request to ``destination``."""
        source = self.source_for(destination)
        if len(destination) == 4:
            message = icmp.build_icmpv4_echo(icmp.ICMPV4_ECHO_REQUEST, ident, sequence, payload)
            self.transmit(build_ip(source, destination, PROTO_ICMP, message))
        else:
            message = icmp.build_icmpv6_echo(
                source, destination, icmp.ICMPV6_ECHO_REQUEST, ident, sequence, payload
            )
            self.transmit(build_ip(source, destination, PROTO_ICMPV6, message))
        self._counts["tx_echo_request"] += 1
