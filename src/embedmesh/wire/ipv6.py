"""IPv6 header (RFC 8200): parse a packet into an :class:`IPv6Header`, its upper-layer protocol and
payload view, and build one.

Parsing walks the extension headers an end host must understand (RFC 8200 §4.1: Hop-by-Hop Options,
Routing, Destination Options) and hands back the upper-layer protocol and a zero-copy view of its
payload, cut at the header's Payload Length. Fragments are refused for now: a mesh overlay sets its
MTU so that peers never need to fragment (RFC 8200 §5 requires 1280 bytes end to end).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeAlias

from embedmesh.errors import ParseError

__all__ = [
    "HEADER_LENGTH",
    "MAX_PAYLOAD_LENGTH",
    "NEXT_HEADER_DESTINATION_OPTIONS",
    "NEXT_HEADER_FRAGMENT",
    "NEXT_HEADER_HOP_BY_HOP",
    "NEXT_HEADER_NONE",
    "NEXT_HEADER_ROUTING",
    "IPv6Header",
    "build_ipv6",
    "parse_ipv6",
]

Buffer: TypeAlias = bytes | bytearray | memoryview

HEADER_LENGTH = 40
"""The fixed IPv6 header is 40 bytes (RFC 8200 §3)."""

MAX_PAYLOAD_LENGTH = 0xFFFF
"""Payload Length is a 16-bit field; jumbograms (RFC 2675) are not supported."""

NEXT_HEADER_HOP_BY_HOP = 0
NEXT_HEADER_ROUTING = 43
NEXT_HEADER_FRAGMENT = 44
NEXT_HEADER_NONE = 59
NEXT_HEADER_DESTINATION_OPTIONS = 60

_OPTIONS_HEADERS = (NEXT_HEADER_HOP_BY_HOP, NEXT_HEADER_DESTINATION_OPTIONS)
_SKIPPED_HEADERS = frozenset((NEXT_HEADER_HOP_BY_HOP, NEXT_HEADER_ROUTING, NEXT_HEADER_DESTINATION_OPTIONS))
_OPTION_PAD1 = 0

# Version/Traffic Class/Flow Label, Payload Length, Next Header, Hop Limit, Source, Destination.
_HEADER = struct.Struct("!IHBB16s16s")
_unpack_from = _HEADER.unpack_from
_pack = _HEADER.pack


@dataclass(slots=True)
class IPv6Header:
    """The fields of the fixed IPv6 header.

    ``src`` and ``dst`` are raw 16-byte addresses. ``next_header`` is the field in the fixed header
    (possibly an extension header); :func:`parse_ipv6` separately returns the upper-layer protocol.
    """

    src: bytes
    dst: bytes
    next_header: int
    hop_limit: int
    payload_length: int
    traffic_class: int
    flow_label: int


def parse_ipv6(packet: Buffer) -> tuple[IPv6Header, int, memoryview]:
    """Parse an IPv6 packet into its header, upper-layer protocol and a zero-copy payload view.

    Validates the version and the payload length against the buffer (a longer buffer is allowed and
    the excess ignored), then skips Hop-by-Hop Options (only directly after the fixed header), Routing
    (only with Segments Left zero, since this host forwards nothing) and Destination Options headers,
    checking their lengths and options. A Fragment header raises :class:`ParseError`; No Next Header
    (59) returns protocol 59 and an empty payload. Any other value is returned as the protocol.
    """
    length = len(packet)
    if length < HEADER_LENGTH:
        raise ParseError(f"IPv6 packet too short: {length} bytes, header needs {HEADER_LENGTH}")
    first_word, payload_length, next_header, hop_limit, src, dst = _unpack_from(packet)
    if first_word >> 28 != 6:
        raise ParseError(f"not an IPv6 packet: version {first_word >> 28}")
    end = HEADER_LENGTH + payload_length
    if end > length:
        raise ParseError(
            f"IPv6 payload length {payload_length} exceeds the {length - HEADER_LENGTH} bytes received"
        )
    view = memoryview(packet)
    header = IPv6Header(
        src,
        dst,
        next_header,
        hop_limit,
        payload_length,
        (first_word >> 20) & 0xFF,
        first_word & 0xFFFFF,
    )
    protocol = next_header
    offset = HEADER_LENGTH
    while protocol in _SKIPPED_HEADERS:
        # Every one of these starts with Next Header and Hdr Ext Len in 8-octet units, not counting
        # the first 8 (RFC 8200 §4.3, §4.4, §4.6).
        if offset + 2 > end:
            raise ParseError(f"IPv6 extension header {protocol} truncated at offset {offset}")
        header_end = offset + (view[offset + 1] + 1) * 8
        if header_end > end:
            raise ParseError(f"IPv6 extension header {protocol} at offset {offset} overruns the payload")
        if protocol == NEXT_HEADER_ROUTING:
            # RFC 8200 §4.4: with Segments Left zero the header is ignored; otherwise the packet is
            # for a router on the way, and an end host must not act on it (RFC 5095 for type 0).
            segments_left = view[offset + 3]
            if segments_left:
                raise ParseError(
                    f"IPv6 routing header with {segments_left} segments left: not a final destination"
                )
        else:
            if protocol == NEXT_HEADER_HOP_BY_HOP and offset != HEADER_LENGTH:
                # RFC 8200 §4.1: Hop-by-Hop Options may only follow the fixed header immediately.
                raise ParseError("IPv6 hop-by-hop options header is not directly after the fixed header")
            _check_options(view, offset + 2, header_end)
        protocol = view[offset]
        offset = header_end
    if protocol == NEXT_HEADER_FRAGMENT:
        raise ParseError("fragmented IPv6 not supported")
    if protocol == NEXT_HEADER_NONE:
        # RFC 8200 §4.7: bytes after a No Next Header are ignored.
        return header, protocol, view[offset:offset]
    return header, protocol, view[offset:end]


def _check_options(view: memoryview, start: int, stop: int) -> None:
    """Walk the TLV options of a Hop-by-Hop or Destination Options header (RFC 8200 §4.2).

    Pad1 and PadN are the only options this host knows, and PadN's type (1) already has the action
    bits 00. An unknown option is skipped only when the two high-order bits of its type are 00; any
    other action means the packet must be discarded (and maybe answered, which is the caller's call).
    """
    position = start
    while position < stop:
        option_type = view[position]
        if option_type == _OPTION_PAD1:
            position += 1
            continue
        if position + 2 > stop:
            raise ParseError(f"IPv6 option {option_type:#04x} truncated")
        option_end = position + 2 + view[position + 1]
        if option_end > stop:
            raise ParseError(f"IPv6 option {option_type:#04x} overruns its extension header")
        if option_type >> 6:
            raise ParseError(f"unrecognized IPv6 option {option_type:#04x} requires discarding the packet")
        position = option_end


def build_ipv6(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload: Buffer,
    *,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    """Return an IPv6 packet (fixed header only) carrying ``payload``.

    Raises ``ValueError`` on addresses that are not 16 bytes, out-of-range fields or a payload longer
    than Payload Length can express.
    """
    if len(src) != 16 or len(dst) != 16:
        raise ValueError("IPv6 addresses must be 16 bytes")
    if len(payload) > MAX_PAYLOAD_LENGTH:
        raise ValueError(f"IPv6 payload of {len(payload)} bytes exceeds the 65,535-byte maximum")
    if not 0 <= traffic_class <= 0xFF or not 0 <= flow_label <= 0xFFFFF:
        raise ValueError("IPv6 traffic class must fit 8 bits and flow label 20 bits")
    try:
        header = _pack(
            0x60000000 | traffic_class << 20 | flow_label, len(payload), next_header, hop_limit, src, dst
        )
    except struct.error as exc:
        raise ValueError(f"IPv6 header field out of range: {exc}") from None
    return header + payload
