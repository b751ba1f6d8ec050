"""Fuzz target for the ICMPv4 and ICMPv6 parsers and builders.

Each input is tried as a bare ICMPv4 message, as a bare ICMPv6 message between fixed addresses, and
as a whole IP packet (so the seeds can be real captures); also with its checksum patched in, since
random bytes rarely carry a valid one. Invariants: a message with a correct checksum always parses,
and an echo message rebuilt from its fields comes out byte for byte (checksum aside).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from embedmesh.errors import ParseError
from embedmesh.wire.checksum import checksum, pseudo_header_sum
from embedmesh.wire.icmp import (
    ICMPV4_DEST_UNREACH,
    ICMPV4_ECHO_REPLY,
    ICMPV4_ECHO_REQUEST,
    ICMPV6_DEST_UNREACH,
    ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST,
    IcmpMessage,
    build_icmpv4_echo,
    build_icmpv4_unreachable,
    build_icmpv6_echo,
    build_icmpv6_unreachable,
    parse_icmpv4,
    parse_icmpv6,
)
from embedmesh.wire.ip import PROTO_ICMP, PROTO_ICMPV6, parse_ip

SRC6 = bytes.fromhex("fd000000000000000000000000000001")
DST6 = bytes.fromhex("fd000000000000000000000000000002")


def _same_but_checksum(rebuilt: bytes, original: bytes | memoryview) -> None:
    # One's complement has two zeros: a message whose other words sum to 0xFFFF verifies with
    # checksum 0x0000 or 0xFFFF, and the builder picks 0x0000.
    original = bytes(original)
    assert rebuilt[:2] + rebuilt[4:] == original[:2] + original[4:]


def _check_v4(data: bytes | memoryview) -> None:
    try:
        message = parse_icmpv4(data)
    except ParseError:
        return
    _check_rebuild_v4(message, data)


def _check_rebuild_v4(message: IcmpMessage, data: bytes | memoryview) -> None:
    if message.type in (ICMPV4_ECHO_REQUEST, ICMPV4_ECHO_REPLY) and message.code == 0:
        rebuilt = build_icmpv4_echo(message.type, message.ident, message.sequence, message.payload)
        _same_but_checksum(rebuilt, data)
    elif message.type == ICMPV4_DEST_UNREACH and message.ident == 0:
        rebuilt = build_icmpv4_unreachable(message.code, message.payload, next_hop_mtu=message.sequence)
        again = parse_icmpv4(rebuilt)
        assert (again.type, again.code, again.sequence) == (message.type, message.code, message.sequence)
        assert bytes(message.payload).startswith(bytes(again.payload))


def _check_v6(data: bytes | memoryview, src: bytes, dst: bytes) -> None:
    try:
        message = parse_icmpv6(data, src, dst)
    except ParseError:
        return
    _check_rebuild_v6(message, data, src, dst)


def _check_rebuild_v6(message: IcmpMessage, data: bytes | memoryview, src: bytes, dst: bytes) -> None:
    if message.type in (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY) and message.code == 0:
        rebuilt = build_icmpv6_echo(src, dst, message.type, message.ident, message.sequence, message.payload)
        _same_but_checksum(rebuilt, data)
    elif message.type == ICMPV6_DEST_UNREACH and message.ident == 0 and message.sequence == 0:
        rebuilt = build_icmpv6_unreachable(src, dst, message.code, message.payload)
        again = parse_icmpv6(rebuilt, src, dst)
        assert (again.type, again.code) == (message.type, message.code)
        assert bytes(message.payload).startswith(bytes(again.payload))


def _patched(data: bytes, initial: int) -> bytes:
    """Return ``data`` with a correct ICMP checksum for the given pseudo-header sum."""
    message = bytearray(data)
    message[2:4] = b"\x00\x00"
    message[2:4] = checksum(message, initial).to_bytes(2, "big")
    return bytes(message)


def TestOneInput(data: bytes) -> None:
    """Parse ``data`` as ICMP every way; only ParseError may escape a parser."""
    _check_v4(data)
    _check_v6(data, SRC6, DST6)
    if len(data) >= 8:
        # With a correct checksum, any message of 8 bytes or more must parse.
        patched = _patched(data, 0)
        _check_rebuild_v4(parse_icmpv4(patched), patched)
        patched = _patched(data, pseudo_header_sum(SRC6, DST6, PROTO_ICMPV6, len(data)))
        _check_rebuild_v6(parse_icmpv6(patched, SRC6, DST6), patched, SRC6, DST6)
    try:
        packet = parse_ip(data)
    except ParseError:
        return
    if packet.protocol == PROTO_ICMP:
        _check_v4(packet.payload)
    elif packet.protocol == PROTO_ICMPV6 and packet.version == 6:
        _check_v6(packet.payload, packet.src, packet.dst)


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
