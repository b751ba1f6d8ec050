"""IPv4 header (RFC 791): parse a packet into an :class:`IPv4Header` and a payload view, and build one.

Parsing never copies the payload: it returns a ``memoryview`` slice of the caller's buffer, cut at the
header's Total Length so that link-layer padding or trailing garbage is not mistaken for payload.
Options are skipped (the header length covers them and the checksum includes them) but not
interpreted; nothing in a mesh overlay needs them. Fragments are parsed, not reassembled: the header
carries the flags and offset a reassembler needs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeAlias

from embedmesh.errors import ParseError
from embedmesh.wire.checksum import checksum, ones_sum

__all__ = [
    "FLAG_DF",
    "FLAG_MF",
    "FLAG_RESERVED",
    "HEADER_LENGTH",
    "MAX_PACKET_LENGTH",
    "IPv4Header",
    "build_ipv4",
    "build_ipv4_summed",
    "header_partial_sum",
    "parse_ipv4",
]

Buffer: TypeAlias = bytes | bytearray | memoryview

HEADER_LENGTH = 20
"""Length of an IPv4 header without options."""

MAX_PACKET_LENGTH = 0xFFFF
"""Total Length is a 16-bit field (RFC 791 §3.1)."""

FLAG_RESERVED = 0x4
FLAG_DF = 0x2
"""Don't Fragment."""
FLAG_MF = 0x1
"""More Fragments."""

# Version/IHL, TOS, Total Length, Identification, Flags/Fragment Offset, TTL, Protocol, Header
# Checksum, Source, Destination (RFC 791 §3.1).
_HEADER = struct.Struct("!BBHHHBBH4s4s")
_unpack_from = _HEADER.unpack_from
_pack = _HEADER.pack


@dataclass(slots=True)
class IPv4Header:
    """The fields of an IPv4 header that the stack uses.

    ``src`` and ``dst`` are raw 4-byte addresses. ``flags`` is the 3-bit flags field (``FLAG_DF``,
    ``FLAG_MF``, ``FLAG_RESERVED``); ``fragment_offset`` is in bytes (the field times 8).
    ``header_length`` includes options; ``total_length`` is the header plus payload.
    """

    src: bytes
    dst: bytes
    protocol: int
    ttl: int
    ident: int
    flags: int
    fragment_offset: int
    tos: int
    header_length: int
    total_length: int

    @property
    def dont_fragment(self) -> bool:
        """Whether the Don't Fragment flag is set."""
        return bool(self.flags & FLAG_DF)

    @property
    def more_fragments(self) -> bool:
        """Whether the More Fragments flag is set."""
        return bool(self.flags & FLAG_MF)

    @property
    def is_fragment(self) -> bool:
        """Whether this packet is one fragment of a larger datagram (RFC 791 §2.3)."""
        return bool(self.flags & FLAG_MF) or self.fragment_offset != 0


def parse_ipv4(packet: Buffer) -> tuple[IPv4Header, memoryview]:
    """Parse an IPv4 packet into its header and a zero-copy view of its payload.

    Validates the version, the header length (at least 20 bytes, within the buffer), the total
    length (at least the header, at most the buffer; a longer buffer is allowed and the excess
    ignored, as link layers pad) and the header checksum. Raises :class:`ParseError` otherwise.
    """
    length = len(packet)
    if length < HEADER_LENGTH:
        raise ParseError(f"IPv4 packet too short: {length} bytes, header needs {HEADER_LENGTH}")
    (
        version_ihl,
        tos,
        total_length,
        ident,
        flags_offset,
        ttl,
        protocol,
        _checksum,
        src,
        dst,
    ) = _unpack_from(packet)
    if version_ihl >> 4 != 4:
        raise ParseError(f"not an IPv4 packet: version {version_ihl >> 4}")
    header_length = (version_ihl & 0x0F) * 4
    if header_length < HEADER_LENGTH:
        raise ParseError(f"IPv4 header length {header_length} is below the minimum of {HEADER_LENGTH}")
    if total_length < header_length:
        raise ParseError(f"IPv4 total length {total_length} is shorter than its header ({header_length})")
    if total_length > length:
        raise ParseError(f"IPv4 total length {total_length} exceeds the {length} bytes received")
    view = memoryview(packet)
    # RFC 791 §3.1: the one's-complement sum over the header, checksum included, is all ones.
    if ones_sum(view[:header_length]) != 0xFFFF:
        raise ParseError("IPv4 header checksum mismatch")
    header = IPv4Header(
        src,
        dst,
        protocol,
        ttl,
        ident,
        flags_offset >> 13,
        (flags_offset & 0x1FFF) << 3,
        tos,
        header_length,
        total_length,
    )
    return header, view[header_length:total_length]


def build_ipv4(
    src: bytes,
    dst: bytes,
    protocol: int,
    payload: Buffer,
    *,
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    dont_fragment: bool = True,
) -> bytes:
    """Return an IPv4 packet (20-byte header, no options) carrying ``payload``, checksum filled in.

    ``dont_fragment`` defaults to True: the overlay runs path MTU discovery rather than fragmenting
    (RFC 1191), and a zero Identification is then allowed (RFC 6864 §4.1). Raises ``ValueError`` on
    addresses that are not 4 bytes, out-of-range fields or a payload too long for Total Length.
    """
    if len(src) != 4 or len(dst) != 4:
        raise ValueError("IPv4 addresses must be 4 bytes")
    total_length = HEADER_LENGTH + len(payload)
    if total_length > MAX_PACKET_LENGTH:
        raise ValueError(f"IPv4 payload of {len(payload)} bytes exceeds the 65,515-byte maximum")
    flags_offset = FLAG_DF << 13 if dont_fragment else 0
    try:
        header = _pack(0x45, tos, total_length, ident, flags_offset, ttl, protocol, 0, src, dst)
    except struct.error as exc:
        raise ValueError(f"IPv4 header field out of range: {exc}") from None
    header_checksum = checksum(header)
    # Packing twice is cheaper than splicing the checksum into a bytearray.
    return (
        _pack(0x45, tos, total_length, ident, flags_offset, ttl, protocol, header_checksum, src, dst)
        + payload
    )


def header_partial_sum(src: bytes, dst: bytes, protocol: int, *, ttl: int = 64) -> int:
    """The one's-complement sum of the header :func:`build_ipv4` emits with its defaults (DF, no
    Identification, TOS 0), without Total Length and checksum: for :func:`build_ipv4_summed`."""
    if len(src) != 4 or len(dst) != 4:
        raise ValueError("IPv4 addresses must be 4 bytes")
    return ones_sum(_pack(0x45, 0, 0, 0, FLAG_DF << 13, ttl, protocol, 0, src, dst))


def build_ipv4_summed(
    partial: int, src: bytes, dst: bytes, protocol: int, payload: Buffer, *, ttl: int = 64
) -> bytes:
    """:func:`build_ipv4` with its defaults, byte for byte, for a sender that keeps
    ``partial = header_partial_sum(src, dst, protocol, ttl=ttl)`` per address pair: the checksum is
    then one addition and one modulo (the length is the only field that changes, RFC 1624)."""
    total_length = HEADER_LENGTH + len(payload)
    if total_length > MAX_PACKET_LENGTH:
        raise ValueError(f"IPv4 payload of {len(payload)} bytes exceeds the 65,515-byte maximum")
    # The complement of the sum, with 0 (not 0xFFFF) for a multiple of 0xFFFF, as checksum() gives.
    header_checksum = -(partial + total_length) % 0xFFFF
    return _pack(0x45, 0, total_length, 0, FLAG_DF << 13, ttl, protocol, header_checksum, src, dst) + payload
