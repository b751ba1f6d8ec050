"""Fuzz target for ``parse_udp``/``build_udp``.

Each input is tried as a bare UDP datagram between fixed IPv4 and IPv6 addresses and as a whole IP
packet (so the seeds can be real captures). Invariants: a datagram parsed without checksum
verification and rebuilt parses back with verification to the same fields, and one that verified
with a nonzero checksum is rebuilt byte for byte.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from embedmesh.errors import ParseError
from embedmesh.wire.ip import PROTO_UDP, parse_ip
from embedmesh.wire.udp import build_udp, parse_udp

ADDRESSES = (
    (bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])),
    (bytes.fromhex("fd000000000000000000000000000001"), bytes.fromhex("fd000000000000000000000000000002")),
)


def _check(data: bytes | memoryview, src: bytes, dst: bytes) -> None:
    try:
        datagram = parse_udp(data, src, dst, verify_checksum=False)
    except ParseError:
        return
    fields = (datagram.src_port, datagram.dst_port, bytes(datagram.payload))
    rebuilt = build_udp(src, dst, *fields)
    again = parse_udp(rebuilt, src, dst)
    assert (again.src_port, again.dst_port, bytes(again.payload)) == fields
    try:
        verified = parse_udp(data, src, dst)
    except ParseError:
        return
    assert (verified.src_port, verified.dst_port, bytes(verified.payload)) == fields
    if data[6] or data[7]:
        assert rebuilt == bytes(data[: len(rebuilt)])


def TestOneInput(data: bytes) -> None:
    """Parse ``data`` as UDP every way; only ParseError may escape a parser."""
    for src, dst in ADDRESSES:
        _check(data, src, dst)
    try:
        packet = parse_ip(data)
    except ParseError:
        return
    if packet.protocol == PROTO_UDP:
        _check(packet.payload, packet.src, packet.dst)


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
