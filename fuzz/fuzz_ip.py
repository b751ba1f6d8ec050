"""Fuzz target for the IP layer: ``parse_ip``, ``parse_ipv4``, ``parse_ipv6``, ``ip_version`` and
``destination_of``.

Beyond "only ParseError escapes", it checks invariants: a parsed packet rebuilt with the same fields
comes out byte for byte (checksum aside, see below), and the payload view matches the lengths the
header states. Because random bytes rarely carry a valid IPv4 header checksum, every input is also
tried with its checksum patched in, so the fuzzer reaches the code behind the check.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import contextlib

from embedmesh.errors import ParseError
from embedmesh.wire.checksum import checksum
from embedmesh.wire.ip import destination_of, ip_version, parse_ip
from embedmesh.wire.ipv4 import FLAG_DF, build_ipv4, parse_ipv4
from embedmesh.wire.ipv6 import build_ipv6, parse_ipv6


def _check_ipv4(data: bytes) -> None:
    header, payload = parse_ipv4(data)
    assert len(payload) == header.total_length - header.header_length
    assert bytes(payload) == data[header.header_length : header.total_length]
    if header.header_length == 20 and header.flags in (0, FLAG_DF) and header.fragment_offset == 0:
        rebuilt = build_ipv4(
            header.src,
            header.dst,
            header.protocol,
            payload,
            ttl=header.ttl,
            ident=header.ident,
            tos=header.tos,
            dont_fragment=header.flags == FLAG_DF,
        )
        # A header whose other words sum to 0xFFFF verifies with checksum 0x0000 or 0xFFFF (one's
        # complement has two zeros), and the builder picks 0x0000; compare everything else.
        original = data[: header.total_length]
        assert rebuilt[:10] + rebuilt[12:] == original[:10] + original[12:]
        parse_ipv4(rebuilt)


def _check_ipv6(data: bytes) -> None:
    header, protocol, payload = parse_ipv6(data)
    end = 40 + header.payload_length
    assert len(payload) <= header.payload_length
    if protocol != 59:
        assert bytes(payload) == data[end - len(payload) : end]
    if header.next_header == protocol and protocol not in (0, 43, 44, 59, 60):
        rebuilt = build_ipv6(
            header.src,
            header.dst,
            header.next_header,
            payload,
            hop_limit=header.hop_limit,
            traffic_class=header.traffic_class,
            flow_label=header.flow_label,
        )
        assert rebuilt == data[:end]


def _with_ipv4_checksum(data: bytes) -> bytes:
    """Return ``data`` with a correct IPv4 header checksum, where it has a header to patch."""
    header_length = (data[0] & 0x0F) * 4
    if header_length < 20 or header_length > len(data):
        return data
    header = bytearray(data[:header_length])
    header[10:12] = b"\x00\x00"
    header[10:12] = checksum(header).to_bytes(2, "big")
    return bytes(header) + data[header_length:]


def TestOneInput(data: bytes) -> None:
    """Parse ``data`` every way the IP layer can; only ParseError may escape a parser."""
    try:
        version = ip_version(data)
    except ParseError:
        version = 0
    try:
        destination = destination_of(data)
        assert destination == (data[16:20] if version == 4 else data[24:40])
    except ParseError:
        pass
    try:
        packet = parse_ip(data)
        assert packet.version == version
    except ParseError:
        pass
    with contextlib.suppress(ParseError):
        _check_ipv4(data)
    if version == 4:
        with contextlib.suppress(ParseError):
            _check_ipv4(_with_ipv4_checksum(data))
    with contextlib.suppress(ParseError):
        _check_ipv6(data)


if __name__ == "__main__":
    from harness import run

    run(TestOneInput)
