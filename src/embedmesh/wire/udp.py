"""UDP datagrams (RFC 768) over IPv4 or IPv6: parse into a :class:`UdpDatagram`, build with checksum.

The checksum covers a pseudo-header of the enclosing IP packet (RFC 768; RFC 8200 §8.1), so both
functions take the raw source and destination addresses; their length (4 or 16) selects the IP
version.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TypeAlias

from embedmesh.errors import ParseError
from embedmesh.wire.checksum import checksum, ones_sum, pseudo_header_sum
from embedmesh.wire.ip import PROTO_UDP

__all__ = [
    "HEADER_LENGTH",
    "MAX_DATAGRAM_LENGTH",
    "UdpDatagram",
    "build_udp",
    "parse_udp",
]

Buffer: TypeAlias = bytes | bytearray | memoryview

HEADER_LENGTH = 8
MAX_DATAGRAM_LENGTH = 0xFFFF
"""The Length field is 16 bits; IPv6 jumbograms (RFC 2675) are not supported."""

# Source Port, Destination Port, Length, Checksum.
_HEADER = struct.Struct("!HHHH")
_unpack_from = _HEADER.unpack_from
_pack = _HEADER.pack


@dataclass(slots=True)
class UdpDatagram:
    """A UDP datagram; ``payload`` is a view into the buffer that was parsed."""

    src_port: int
    dst_port: int
    payload: memoryview


def parse_udp(data: Buffer, src: bytes, dst: bytes, *, verify_checksum: bool = True) -> UdpDatagram:
    """Parse a UDP datagram (the IP payload) sent from raw address ``src`` to ``dst``.

    Validates the Length field (at least the header, at most the bytes received; bytes past it are
    ignored, as Linux does) and, unless ``verify_checksum`` is False, the checksum: on IPv4 a zero
    checksum means the sender did not compute one (RFC 768), on IPv6 it is invalid (RFC 8200 §8.1).
    Raises :class:`ParseError` on any failure.
    """
    received = len(data)
    if received < HEADER_LENGTH:
        raise ParseError(f"UDP datagram too short: {received} bytes, header needs {HEADER_LENGTH}")
    src_port, dst_port, length, datagram_checksum = _unpack_from(data)
    if length < HEADER_LENGTH:
        raise ParseError(f"UDP length field {length} is shorter than the header")
    if length > received:
        raise ParseError(f"UDP length field {length} exceeds the {received} bytes received")
    view = memoryview(data)
    if verify_checksum:
        if datagram_checksum == 0:
            if len(src) != 4:
                raise ParseError("UDP over IPv6 with a zero checksum (RFC 8200 §8.1 requires one)")
        elif ones_sum(view[:length], pseudo_header_sum(src, dst, PROTO_UDP, length)) != 0xFFFF:
            raise ParseError("UDP checksum mismatch")
    return UdpDatagram(src_port, dst_port, view[HEADER_LENGTH:length])


def build_udp(src: bytes, dst: bytes, src_port: int, dst_port: int, payload: Buffer) -> bytes:
    """Return a UDP datagram from ``src``:``src_port`` to ``dst``:``dst_port``, checksum filled in.

    The checksum is always computed, on IPv4 too. A computed checksum of zero is sent as 0xFFFF, its
    one's-complement equivalent, because zero on the wire means "no checksum" (RFC 768). Raises
    ``ValueError`` on mismatched addresses, out-of-range ports or a payload too long for the Length
    field.
    """
    if len(src) != len(dst) or (len(src) != 4 and len(src) != 16):
        raise ValueError("UDP needs two IPv4 (4-byte) or two IPv6 (16-byte) addresses")
    length = HEADER_LENGTH + len(payload)
    if length > MAX_DATAGRAM_LENGTH:
        raise ValueError(f"UDP payload of {len(payload)} bytes exceeds the 65,527-byte maximum")
    if not 0 <= src_port <= 0xFFFF or not 0 <= dst_port <= 0xFFFF:
        raise ValueError(f"UDP ports must fit 16 bits: {src_port}, {dst_port}")
    # The header words are summed as integers rather than packed twice; the payload starts on a word
    # boundary after the 8-byte header, so the sums chain.
    initial = pseudo_header_sum(src, dst, PROTO_UDP, length) + src_port + dst_port + length
    datagram_checksum = checksum(payload, initial) or 0xFFFF
    return _pack(src_port, dst_port, length, datagram_checksum) + payload
