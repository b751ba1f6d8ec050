"""Version-independent view of an IP packet, protocol numbers and address conversions.

The overlay carries IPv4 and IPv6 side by side, and most code above this layer only needs the
addresses, the upper-layer protocol and its payload. :func:`parse_ip` dispatches on the version
nibble and returns that as an :class:`IpPacket`. Addresses are raw ``bytes`` (4 or 16 long) on the
per-packet path; :func:`address_to_bytes` and :func:`bytes_to_address` convert at the edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TypeAlias

from embedmesh.errors import ParseError
from embedmesh.wire.ipv4 import FLAG_MF, build_ipv4, parse_ipv4
from embedmesh.wire.ipv6 import build_ipv6, parse_ipv6

__all__ = [
    "PROTO_ICMP",
    "PROTO_ICMPV6",
    "PROTO_TCP",
    "PROTO_UDP",
    "IpPacket",
    "address_to_bytes",
    "build_ip",
    "bytes_to_address",
    "destination_of",
    "ip_version",
    "parse_ip",
]

Buffer: TypeAlias = bytes | bytearray | memoryview

# IANA protocol numbers, shared by IPv4's Protocol and IPv6's Next Header fields.
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58


@dataclass(slots=True)
class IpPacket:
    """An IPv4 or IPv6 packet reduced to what the transport layer needs.

    ``protocol`` is the upper-layer protocol (after IPv6 extension headers), ``ttl`` is the IPv4 TTL
    or the IPv6 Hop Limit, and ``payload`` is a view into the buffer that was parsed.
    """

    version: int
    src: bytes
    dst: bytes
    protocol: int
    ttl: int
    payload: memoryview


def ip_version(packet: Buffer) -> int:
    """Return the IP version (4 or 6) from the first nibble; :class:`ParseError` for anything else."""
    if not packet:
        raise ParseError("empty IP packet")
    version = packet[0] >> 4
    if version != 4 and version != 6:
        raise ParseError(f"unknown IP version {version}")
    return version


def parse_ip(packet: Buffer) -> IpPacket:
    """Parse an IPv4 or IPv6 packet (see :func:`parse_ipv4` and :func:`parse_ipv6` for what is checked).

    IPv4 fragments raise :class:`ParseError`, like IPv6 ones: an :class:`IpPacket` has no room for
    fragment fields, and a fragment's payload handed up as a whole datagram would be misparsed.
    """
    if ip_version(packet) == 4:
        header, payload = parse_ipv4(packet)
        if header.flags & FLAG_MF or header.fragment_offset:
            raise ParseError("fragmented IPv4 not supported")
        return IpPacket(4, header.src, header.dst, header.protocol, header.ttl, payload)
    header6, protocol, payload = parse_ipv6(packet)
    return IpPacket(6, header6.src, header6.dst, protocol, header6.hop_limit, payload)


def build_ip(src: bytes, dst: bytes, protocol: int, payload: Buffer, *, ttl: int = 64) -> bytes:
    """Return an IPv4 packet if ``src`` is 4 bytes long, an IPv6 packet if it is 16 bytes long."""
    if len(src) == 4:
        return build_ipv4(src, dst, protocol, payload, ttl=ttl)
    if len(src) == 16:
        return build_ipv6(src, dst, protocol, payload, hop_limit=ttl)
    raise ValueError(f"an IP address is 4 or 16 bytes, not {len(src)}")


def destination_of(packet: Buffer) -> bytes:
    """Return the raw destination address of an IP packet without validating anything else.

    The router that picks a peer for an outgoing packet needs only this, so it skips the checksum and
    length checks a full parse does. Raises :class:`ParseError` if the packet is too short for it.
    """
    version = ip_version(packet)
    if version == 4:
        if len(packet) < 20:
            raise ParseError(f"IPv4 packet too short for a destination address: {len(packet)} bytes")
        return bytes(packet[16:20])
    if len(packet) < 40:
        raise ParseError(f"IPv6 packet too short for a destination address: {len(packet)} bytes")
    return bytes(packet[24:40])


def address_to_bytes(address: str | IPv4Address | IPv6Address) -> bytes:
    """Return the raw 4- or 16-byte form of an address; ``ValueError`` if a string is not one."""
    if isinstance(address, str):
        address = ip_address(address)
    return address.packed


def bytes_to_address(raw: bytes) -> IPv4Address | IPv6Address:
    """Return the ``ipaddress`` object for a raw 4- or 16-byte address; ``ValueError`` otherwise."""
    if len(raw) == 4:
        return IPv4Address(bytes(raw))
    if len(raw) == 16:
        return IPv6Address(bytes(raw))
    raise ValueError(f"an IP address is 4 or 16 bytes, not {len(raw)}")
