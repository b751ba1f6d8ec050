"""ICMPv4 (RFC 792) and ICMPv6 (RFC 4443) messages: echo request/reply and destination unreachable.

Every ICMP message starts with Type, Code, Checksum and a 32-bit "rest of header" whose meaning
depends on the type. :class:`IcmpMessage` keeps that word as two 16-bit halves, ``ident`` and
``sequence``: for echo messages they are the Identifier and Sequence Number; for other types they are
whatever the type puts there (zero for destination unreachable, except the next-hop MTU of RFC 1191
in ``sequence``), so parsing loses nothing. The parsers accept every type and verify the checksum;
deciding what to do with a type is the caller's business.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeAlias

from embedmesh.errors import ParseError
from embedmesh.wire.checksum import checksum, ones_sum, pseudo_header_sum
from embedmesh.wire.ip import PROTO_ICMPV6

__all__ = [
    "HEADER_LENGTH",
    "ICMPV4_ADMIN_PROHIBITED",
    "ICMPV4_DEST_UNREACH",
    "ICMPV4_ECHO_REPLY",
    "ICMPV4_ECHO_REQUEST",
    "ICMPV4_ERROR_QUOTE_LIMIT",
    "ICMPV4_FRAGMENTATION_NEEDED",
    "ICMPV4_HOST_UNREACHABLE",
    "ICMPV4_NET_UNREACHABLE",
    "ICMPV4_PORT_UNREACHABLE",
    "ICMPV4_PROTOCOL_UNREACHABLE",
    "ICMPV4_TIME_EXCEEDED",
    "ICMPV6_ADDRESS_UNREACHABLE",
    "ICMPV6_ADMIN_PROHIBITED",
    "ICMPV6_DEST_UNREACH",
    "ICMPV6_ECHO_REPLY",
    "ICMPV6_ECHO_REQUEST",
    "ICMPV6_ERROR_QUOTE_LIMIT",
    "ICMPV6_NO_ROUTE",
    "ICMPV6_PACKET_TOO_BIG",
    "ICMPV6_PARAMETER_PROBLEM",
    "ICMPV6_PORT_UNREACHABLE",
    "ICMPV6_TIME_EXCEEDED",
    "IcmpMessage",
    "build_icmpv4_echo",
    "build_icmpv4_unreachable",
    "build_icmpv6_echo",
    "build_icmpv6_unreachable",
    "parse_icmpv4",
    "parse_icmpv6",
]

Buffer: TypeAlias = bytes | bytearray | memoryview

ICMPV4_ECHO_REPLY = 0
ICMPV4_DEST_UNREACH = 3
ICMPV4_ECHO_REQUEST = 8
ICMPV4_TIME_EXCEEDED = 11

# Destination Unreachable codes (RFC 792, RFC 1812 §5.2.7.1).
ICMPV4_NET_UNREACHABLE = 0
ICMPV4_HOST_UNREACHABLE = 1
ICMPV4_PROTOCOL_UNREACHABLE = 2
ICMPV4_PORT_UNREACHABLE = 3
ICMPV4_FRAGMENTATION_NEEDED = 4
ICMPV4_ADMIN_PROHIBITED = 13

ICMPV6_DEST_UNREACH = 1
ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_PARAMETER_PROBLEM = 4
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129

# Destination Unreachable codes (RFC 4443 §3.1).
ICMPV6_NO_ROUTE = 0
ICMPV6_ADMIN_PROHIBITED = 1
ICMPV6_ADDRESS_UNREACHABLE = 3
ICMPV6_PORT_UNREACHABLE = 4

HEADER_LENGTH = 8
"""Type, Code, Checksum and the 32-bit rest of header."""

# RFC 1812 §4.3.2.3: an ICMPv4 error holds as much of the offending datagram as fits in a 576-byte IP
# datagram; with a 20-byte IP header and the 8-byte ICMP header that leaves 548 bytes (Linux's choice
# too, net/ipv4/icmp.c).
ICMPV4_ERROR_QUOTE_LIMIT = 576 - 20 - HEADER_LENGTH
# RFC 4443 §2.4 (c): an ICMPv6 error holds as much as fits without exceeding the minimum IPv6 MTU.
ICMPV6_ERROR_QUOTE_LIMIT = 1280 - 40 - HEADER_LENGTH

_HEADER = struct.Struct("!BBHHH")
_unpack_from = _HEADER.unpack_from
_pack = _HEADER.pack
_LENGTH16 = struct.Struct("!H")


@dataclass(slots=True)
class IcmpMessage:
    """An ICMPv4 or ICMPv6 message.

    ``ident`` and ``sequence`` are the two halves of the rest-of-header word (the echo Identifier and
    Sequence Number; for errors usually zero). ``payload`` is a view of the echo data or, for an
    error, of the quoted original datagram.
    """

    type: int
    code: int
    ident: int
    sequence: int
    payload: memoryview


def parse_icmpv4(data: Buffer) -> IcmpMessage:
    """Parse an ICMPv4 message (the IPv4 payload), verifying its checksum (RFC 792).

    Raises :class:`ParseError` if the message is shorter than its 8-byte header or the checksum over
    the whole message does not verify.
    """
    length = len(data)
    if length < HEADER_LENGTH:
        raise ParseError(f"ICMPv4 message too short: {length} bytes, header needs {HEADER_LENGTH}")
    view = memoryview(data)
    # The one's-complement sum over the message, checksum included, is all ones when intact.
    if ones_sum(view) != 0xFFFF:
        raise ParseError("ICMPv4 checksum mismatch")
    message_type, code, _checksum, ident, sequence = _unpack_from(view)
    return IcmpMessage(message_type, code, ident, sequence, view[HEADER_LENGTH:])


def parse_icmpv6(data: Buffer, src: bytes, dst: bytes) -> IcmpMessage:
    """Parse an ICMPv6 message (the upper-layer payload) sent from ``src`` to ``dst``.

    The checksum covers the IPv6 pseudo-header as well as the message (RFC 4443 §2.3), so the raw
    16-byte addresses of the enclosing packet are needed. Raises :class:`ParseError` if the message is
    shorter than 8 bytes or the checksum does not verify.
    """
    length = len(data)
    if length < HEADER_LENGTH:
        raise ParseError(f"ICMPv6 message too short: {length} bytes, header needs {HEADER_LENGTH}")
    view = memoryview(data)
    if ones_sum(view, pseudo_header_sum(src, dst, PROTO_ICMPV6, length)) != 0xFFFF:
        raise ParseError("ICMPv6 checksum mismatch")
    message_type, code, _checksum, ident, sequence = _unpack_from(view)
    return IcmpMessage(message_type, code, ident, sequence, view[HEADER_LENGTH:])


def _build(message_type: int, code: int, ident: int, sequence: int, payload: Buffer, initial: int) -> bytes:
    """Return an ICMP message; ``initial`` is the pseudo-header sum (ICMPv6) or 0 (ICMPv4)."""
    try:
        header = _pack(message_type, code, 0, ident, sequence)
    except struct.error as exc:
        raise ValueError(f"ICMP header field out of range: {exc}") from None
    # The header is 8 bytes, so the payload's 16-bit words stay aligned and both sums chain.
    message_checksum = checksum(payload, ones_sum(header, initial))
    return _pack(message_type, code, message_checksum, ident, sequence) + payload


def build_icmpv4_echo(type: int, ident: int, sequence: int, payload: Buffer) -> bytes:
    """Return an ICMPv4 echo request (type 8) or echo reply (type 0) message, checksum filled in.

    A reply echoes the request's ``ident``, ``sequence`` and ``payload`` (RFC 792).
    """
    if type != ICMPV4_ECHO_REQUEST and type != ICMPV4_ECHO_REPLY:
        raise ValueError(f"ICMPv4 echo type must be 8 (request) or 0 (reply), not {type}")
    return _build(type, 0, ident, sequence, payload, 0)


def build_icmpv6_echo(src: bytes, dst: bytes, type: int, ident: int, sequence: int, payload: Buffer) -> bytes:
    """Return an ICMPv6 echo request (128) or reply (129) from ``src`` to ``dst`` (RFC 4443 §4)."""
    if type != ICMPV6_ECHO_REQUEST and type != ICMPV6_ECHO_REPLY:
        raise ValueError(f"ICMPv6 echo type must be 128 (request) or 129 (reply), not {type}")
    _check_ipv6_addresses(src, dst)
    initial = pseudo_header_sum(src, dst, PROTO_ICMPV6, HEADER_LENGTH + len(payload))
    return _build(type, 0, ident, sequence, payload, initial)


def _check_ipv6_addresses(src: bytes, dst: bytes) -> None:
    """Raise ``ValueError`` unless both are 16 bytes: the pseudo-header sum would be silently wrong."""
    if len(src) != 16 or len(dst) != 16:
        raise ValueError("ICMPv6 needs 16-byte source and destination addresses")


def _quote(original: Buffer, limit: int, stated_length: int) -> Buffer:
    """Return the part of ``original`` an error message quotes.

    That is at most ``limit`` bytes, and nothing past ``stated_length`` (the length the original's
    own header states, 0 if unknown): WireGuard pads plaintext to a multiple of 16 bytes, and that
    padding is not part of the datagram.
    """
    length = min(len(original), limit)
    if 0 < stated_length < length:
        length = stated_length
    return original if length == len(original) else memoryview(original)[:length]


def build_icmpv4_unreachable(code: int, original_ip_packet: Buffer, *, next_hop_mtu: int = 0) -> bytes:
    """Return an ICMPv4 destination unreachable message quoting ``original_ip_packet``.

    The quote is the original's IP header and as much of its data as keeps the ICMP datagram within
    576 bytes (RFC 1812 §4.3.2.3, which extends RFC 792's header plus 8 bytes), and never past its
    Total Length. ``next_hop_mtu`` is for code 4, fragmentation needed (RFC 1191 §4). Whether an
    error may be sent at all (not about an ICMP error, a broadcast or a non-initial fragment, RFC
    1122 §3.2.2) is for the caller to decide.
    """
    stated = _LENGTH16.unpack_from(original_ip_packet, 2)[0] if len(original_ip_packet) >= 4 else 0
    if stated < 20:
        stated = 0  # not a believable Total Length: quote what was given
    quote = _quote(original_ip_packet, ICMPV4_ERROR_QUOTE_LIMIT, stated)
    return _build(ICMPV4_DEST_UNREACH, code, 0, next_hop_mtu, quote, 0)


def build_icmpv6_unreachable(src: bytes, dst: bytes, code: int, original_packet: Buffer) -> bytes:
    """Return an ICMPv6 destination unreachable message from ``src`` to ``dst`` quoting ``original_packet``.

    The quote is as much of the original as keeps the whole error packet within the IPv6 minimum MTU
    of 1280 bytes (RFC 4443 §3.1), and never past the original's Payload Length. The RFC 4443 §2.4 (e)
    rules on when not to send an error are for the caller.
    """
    _check_ipv6_addresses(src, dst)
    stated = _LENGTH16.unpack_from(original_packet, 4)[0] + 40 if len(original_packet) >= 6 else 0
    quote = _quote(original_packet, ICMPV6_ERROR_QUOTE_LIMIT, stated)
    initial = pseudo_header_sum(src, dst, PROTO_ICMPV6, HEADER_LENGTH + len(quote))
    return _build(ICMPV6_DEST_UNREACH, code, 0, 0, quote, initial)
